"""The memory-wall report: device profiles, fit arithmetic, decode bound, `kvcompile report`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import DYNAMO
from kvcompile.errors import BadInputError
from kvcompile.memory_wall import (
    MIB,
    bundled_devices,
    load_device,
    memory_wall,
    parse_size,
    tokens_that_fit,
)
from kvcompile.pipeline import CompileOptions, compile_model

MEMORY = {"fp16_bytes_per_token": 2048, "quantized_bytes_per_token": 512, "static_bytes": 4096,
          "elements_per_token": 1024}
WEIGHTS = {"parameters": 1_000_000, "bytes": 4_000_000}


def kvcompile(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvcompile.cli", *args], capture_output=True, text=True)


@pytest.mark.parametrize("text, size", [("1GiB", 1024**3), ("512MiB", 512 * MIB), ("2GB", 2 * 10**9),
                                        ("1048576", 1048576), ("1.5 KiB", 1536), ("64kb", 64000)])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "one gig", "1GiBs", "-1GiB", "0", "5 parsecs"])
def test_parse_size_refuses(text):
    with pytest.raises(BadInputError, match="--budget"):
        parse_size(text)


def test_bundled_profiles_have_sources_and_bandwidth():
    devices = bundled_devices()
    assert {"snapdragon-8-gen-3", "snapdragon-8-elite", "dimensity-9300", "dimensity-9400"} <= set(devices)
    for device in devices.values():
        assert device.sources and device.kind
        assert 30e9 < device.bandwidth_bytes_per_s < 200e9, device.key
        assert device.summary()["note"] == "published specifications, not measurements"
    # LPDDR5X-9600 on a 64-bit bus: 9600e6 * 8 bytes
    assert devices["snapdragon-8-gen-3"].bandwidth_bytes_per_s == 76.8e9


def test_custom_profile_file_with_and_without_its_table(tmp_path):
    body = 'name = "Test SoC"\nmemory = "LPDDR4X"\ntransfer_mts = 4266\nbus_bits = 64\non_chip_mib = 2\n'
    bare = tmp_path / "mine.toml"
    bare.write_text(body)
    tabled = tmp_path / "other.toml"
    tabled.write_text("[test-soc]\n" + body)
    for path, key in ((bare, "mine"), (tabled, "test-soc")):
        device = load_device(str(path))
        assert (device.key, device.name, device.on_chip_bytes, device.kind) == (key, "Test SoC", 2 * MIB, "user-supplied")
    broken = tmp_path / "broken.toml"
    broken.write_text('name = "x"\n')
    with pytest.raises(BadInputError, match="needs name, memory, transfer_mts and bus_bits"):
        load_device(str(broken))
    with pytest.raises(BadInputError, match="unknown device 'pixel-99'; choose from"):
        load_device("pixel-99")


def test_fit_arithmetic_counts_static_scale_bytes():
    assert tokens_that_fit(8 * MIB, 2048) == 4096
    assert tokens_that_fit(8 * MIB, 512, 4096) == (8 * MIB - 4096) // 512 == 16376
    assert tokens_that_fit(1000, 512, 4096) == 0
    wall = memory_wall(MEMORY, WEIGHTS, load_device("snapdragon-8-gen-3"), 256 * MIB)
    assert wall["on_chip_fit_tokens"] == {"fp16": 4096, "compiled": 16376}
    assert wall["budget_fit_tokens"] == {"fp16": 131072, "compiled": (256 * MIB - 4096) // 512}
    assert wall["kv_bytes_per_token"] == {"fp16": 2048, "int8": 1024, "int4": 512, "compiled": 512}


def test_unpublished_on_chip_capacity_is_not_invented():
    wall = memory_wall(MEMORY, WEIGHTS, load_device("dimensity-9400"), MIB)
    assert wall["on_chip_fit_tokens"] == {"fp16": None, "compiled": None}


def test_decode_bound_is_weights_plus_kv_over_bandwidth():
    device = load_device("snapdragon-8-gen-3")
    wall = memory_wall(MEMORY, WEIGHTS, device, MIB)
    rows = wall["decode_lower_bound"]
    first = rows[0]
    assert first["fp16_ms"] == pytest.approx(1e3 * (4e6 + 2048 * first["context"]) / 76.8e9, abs=1e-4)
    speedups = [row["speedup"] for row in rows]
    assert speedups == sorted(speedups) and speedups[-1] < 4.0  # grows with context towards 2048/512
    assert all(row["compiled_ms"] < row["fp16_ms"] for row in rows)
    four_bit = memory_wall(MEMORY, WEIGHTS, device, MIB, weight_bits=4)
    assert four_bit["weights"]["bytes_in_bound"] == 500_000
    assert four_bit["decode_lower_bound"][0]["speedup"] > first["speedup"], "smaller weights: KV matters more"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("wall") / "fixture.kvcompiled"
    compile_model(CompileOptions(model=DYNAMO, out_dir=out, calib_tokens=2048, eval_tokens=2048,
                                 budget="256MiB"))
    return out


@pytest.mark.slow
def test_compile_writes_the_memory_wall(compiled):
    report = json.loads((compiled / "report.json").read_text())
    wall = report["memory_wall"]
    assert wall["device"]["key"] == "snapdragon-8-gen-3" and wall["budget_bytes"] == 256 * MIB
    per_token = wall["kv_bytes_per_token"]
    assert per_token["fp16"] == 2048 and per_token["compiled"] == report["memory"]["quantized_bytes_per_token"]
    assert wall["budget_fit_tokens"]["fp16"] == 131072
    assert wall["budget_fit_tokens"]["compiled"] / wall["budget_fit_tokens"]["fp16"] > 3.8
    assert wall["weights"]["parameters"] > 2_000_000
    markdown = (compiled / "report.md").read_text()
    assert "## Memory wall on Qualcomm Snapdragon 8 Gen 3 (SM8650)" in markdown and "not measurements" in markdown
    assert (compiled / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_report_command_redoes_it_for_another_device_and_budget(compiled):
    png_before = (compiled / "report.png").read_bytes()
    result = kvcompile("report", str(compiled), "--device", "dimensity-9300", "--budget", "1GiB", "--json")
    assert result.returncode == 0, result.stderr
    wall = json.loads(result.stdout)
    assert wall["device"]["key"] == "dimensity-9300" and wall["budget_bytes"] == 1024**3
    assert wall["budget_fit_tokens"]["fp16"] == 524288
    assert json.loads((compiled / "report.json").read_text())["memory_wall"] == wall
    assert "Dimensity 9300" in (compiled / "report.md").read_text()
    assert (compiled / "report.png").read_bytes() != png_before
    listing = kvcompile("report", "--list-devices")
    assert listing.returncode == 0 and "snapdragon-8-elite" in listing.stdout


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--device", "pixel-99"], "unknown device 'pixel-99'"),
    (["--budget", "lots"], "--budget 'lots' is not a size"),
])
def test_report_command_bad_input_is_one_line(compiled, args, message):
    before = (compiled / "report.json").read_bytes()
    result = kvcompile("report", str(compiled), *args)
    assert result.returncode == 2 and message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert (compiled / "report.json").read_bytes() == before, "nothing rewritten on bad input"


def test_report_command_on_a_folder_without_a_report(tmp_path):
    result = kvcompile("report", str(tmp_path))
    assert result.returncode == 2 and "report.json" in result.stderr and "Traceback" not in result.stderr
