"""The clicks family: MovieLens-100K's ratings written out as one click-through table (Parquet), as a user's own
table would arrive, then read only through the schema params.yaml declares for it — the proof that a table family
plugs into the click-through kit (``tasks.ctr``) through the contract alone. Its package: the fetch stage, the config
(the kit's table sections and the pins of its source) and three-line stage modules."""
