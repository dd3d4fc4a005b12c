"""Dry runs of the GPU scripts on the CPU, on a tiny saved model: they must run end to end and pass their checks."""

import importlib.util
import json
import re

import pytest
from conftest import REPO, tiny_model


def script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-qwen3")
    tiny_model("qwen3", attn_implementation="sdpa").save_pretrained(path)
    return str(path)


def test_multi_gpu_script_dry_run_on_two_cpu_devices(saved_model, capsys):
    # A prompt longer than the default windows (64 + 256 + 63), so that the compared runs quantize.
    argv = [saved_model, "--devices", "cpu,cpu", "--dtype", "float32", "--batch", "1", "--prompt-tokens", "400",
            "--new-tokens", "4", "--calib-tokens", "256", "--calib-seq-len", "64"]
    assert script("multi_gpu").main(argv) == 0
    out = capsys.readouterr().out
    for check in ("greedy tokens split == single", "cache storage on its layer's device",
                  "calibration split == single", "oscar-calibrate --device-map balanced"):
        assert re.search(rf"\| {check}\s+\| ok ", out), check
    assert "body 64 tokens 2-bit" in out and "FAIL" not in out


def test_multi_gpu_split_map_puts_half_the_layers_on_each_device(saved_model):
    from transformers import AutoConfig

    device_map = script("multi_gpu").split_device_map(AutoConfig.from_pretrained(saved_model), ["cuda:0", "cuda:1"])
    assert device_map["model.layers.0"] == "cuda:0" and device_map["model.layers.1"] == "cuda:1"


@pytest.mark.parametrize("compiled", [False, True], ids=["eager-steps", "compiled-static-cache"])
def test_stability_script_dry_run(saved_model, capsys, tmp_path, compiled):
    argv = [saved_model, "--steps", "80", "--every", "40", "--device", "cpu", "--dtype", "float32",
            "--prompt-tokens", "400", "--json", str(tmp_path / "s.json")] + (["--compile"] if compiled else [])
    assert script("stability").main(argv) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("stable")
    rows = json.loads((tmp_path / "s.json").read_text())["rows"]
    assert [r["step"] for r in rows] == [40, 80] and rows[-1]["context"] == 480
    assert all(not r["non_finite"] and r["sink_body_recent"][1] > 0 for r in rows)
    # Once a block is demoted, memory per token falls: the exact windows are a fixed cost.
    assert rows[-1]["held_bytes_per_token"] < rows[0]["held_bytes_per_token"]


def test_sass_loop_finds_the_tensor_core_body_loop(capsys):
    """The SASS tool compiles stage 1 for sm_90 without a GPU and finds its tensor-core loop. How many instructions
    each launch configuration issues is a benchmark fact of one Triton version (benchmarks/RESULTS.md), not a test."""
    tool = script("sass_loop")
    missing = tool.tools_missing()
    if missing:
        pytest.skip(f"no SASS tools: {missing}")
    assert tool.main([]) == 0
    out = capsys.readouterr().out
    m = re.search(r"body loop: (\d+) instructions per warp per iteration, ([\d.]+) warp instructions per key", out)
    assert m, out
    assert "HMMA" in out and int(m.group(1)) > 100


def test_generate_step_split_dry_run(capsys, tmp_path):
    """benchmarks/research/generate_step_split.py (issue 19's diagnosis of a compiled generate() step) end to end on
    the CPU: both caches measured, every timing row present and positive."""
    spec = importlib.util.spec_from_file_location("generate_step_split",
                                                  REPO / "benchmarks" / "research" / "generate_step_split.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out_json = tmp_path / "split.json"
    assert module.main(["--tiny", "--context", "600", "--new", "12", "--replays", "4", "--json", str(out_json)]) == 0
    rows = json.loads(out_json.read_text())["rows"]
    assert [r["kind"] for r in rows] == ["oscar", "static"]
    for r in rows:
        assert all(r[key] > 0 for key, _ in module.ROWS), r
    assert "| generate() step (streamer gaps) |" in capsys.readouterr().out
