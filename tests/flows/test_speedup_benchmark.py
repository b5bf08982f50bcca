"""``python -m flows.speedup_benchmark``: the gate's speed-up measured both ways on a family's exported files."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tasks.images.arch_config import MobileArch, ResNetArch
from tasks.images.models import MobileStudent, ResNetTeacher
from tasks.onnx_models import export_fp32
from tests.conftest import write_processed

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_command_tables_both_measurements_on_the_exported_files(tmp_path, real_splits):
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")   # where the exported files are
    params = (ROOT / "params.yaml").read_text()   # how often to time them: the smoke profile's few runs
    (tmp_path / "params.yaml").write_text(params.replace("\nprofile: full\n", "\nprofile: smoke\n", 1))
    x, y = real_splits["test"]
    write_processed(tmp_path / "data/vision/processed", {"test": (x[:64], y[:64])})
    torch.manual_seed(0)
    onnx = tmp_path / "models/vision/onnx"
    export_fp32(MobileStudent(MobileArch(stem=4, widths=[8, 16], strides=[2, 2])), onnx / "student_int8.onnx")
    export_fp32(ResNetTeacher(ResNetArch(stem=8, widths=[16, 32], blocks=[1, 1])), onnx / "teacher_fp32.onnx")
    out = tmp_path / "speedup.json"
    proc = subprocess.run([sys.executable, "-m", "flows.speedup_benchmark", "--family", "vision", "--repeats", "2",
                           "--root", str(tmp_path), "--out", str(out)], capture_output=True, text=True, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| one timing of each, in turn (before) | 2 |" in proc.stdout
    assert "| 3 pairs of rounds, the median pair (the gate's) | 2 |" in proc.stdout
    result = json.loads(out.read_text())
    assert result["pairs"] == 3 and result["floor"] == 0.01 and "machine" in result
    assert all(len(result[k]["speedup"]) == 2 and min(result[k]["speedup"]) > 0 for k in ("before", "paired"))


@pytest.mark.fault("params", "the speed-up benchmark asked for no repeat (`--repeats 0`, or negative)",
                   "a usage error naming the option, exit 2, before anything is read or timed (before: numpy's "
                   "ValueError traceback after loading the family)")
def test_no_repeats_is_a_usage_error_before_anything_is_read(tmp_path, monkeypatch, capsys):
    from flows.speedup_benchmark import main

    monkeypatch.setattr(sys, "argv", ["speedup_benchmark", "--family", "vision", "--repeats", "0",
                                      "--root", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert "--repeats must be at least 1, got 0" in capsys.readouterr().err
