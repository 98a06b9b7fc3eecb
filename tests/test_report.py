"""bench/report.py: the machine line a benchmark's reader compares numbers by, and sections of
docs/BENCHMARKS.md that each benchmark rewrites without touching the others."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import report


def cpuinfo(flags: str) -> str:
    return f"processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 {flags}\n"


def test_the_machine_line_names_the_cpus_int8_instruction_set_and_bf16() -> None:
    # the same model name, INT8 and bf16 numbers apart (bench/int8_fidelity.py)
    assert report.cpu_model(cpuinfo("avx avx2")) == "AMD EPYC (AVX2, no VNNI)"
    assert report.cpu_model(cpuinfo("avx2 avx512f avx512_vnni avx512_bf16")) == \
        "AMD EPYC (AVX-512 VNNI, bf16)"
    assert report.cpu_model(cpuinfo("avx2 avx512f")) == "AMD EPYC (AVX-512, no VNNI)"
    assert report.cpu_model("model name\t: Cortex-A78AE\n") == "Cortex-A78AE"  # no x86 flags


def test_a_benchmark_rewrites_its_own_section_and_keeps_the_others(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    doc = tmp_path / "BENCHMARKS.md"
    monkeypatch.setattr(report, "DOC", doc)
    report.write_section("speed", "Speed", "| a |\n| 1 |")
    report.write_section("accuracy", "Accuracy", "top-1 0.80")
    report.write_section("speed", "Speed", "| a |\n| 2 |")
    text = doc.read_text()
    assert text.startswith("# Benchmarks")
    assert "| 2 |" in text and "| 1 |" not in text and "top-1 0.80" in text
    assert text.index("## Speed") < text.index("## Accuracy")  # rewritten where it was
    assert text.count("Machine: ") == 2 and text.count("Command: `python bench/") == 2


def test_every_benchmark_takes_section_and_no_docs_the_same_way(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """`--section NAME` writes a run beside the benchmark's own section, named in its title;
    `--no-docs` leaves docs/BENCHMARKS.md as it is; and every script in bench/ that writes the
    docs takes both, through report.add_docs_args."""
    import argparse

    doc = tmp_path / "BENCHMARKS.md"
    monkeypatch.setattr(report, "DOC", doc)
    p = argparse.ArgumentParser()
    report.add_docs_args(p)
    report.write_docs(p.parse_args([]), "speed", "Speed", "| a |\n| 1 |")
    report.write_docs(p.parse_args(["--section", "speed-arm"]), "speed", "Speed", "| a |\n| 2 |")
    report.write_docs(p.parse_args(["--no-docs"]), "speed", "Speed", "| a |\n| 3 |")
    text = doc.read_text()
    assert "## Speed\n" in text and "## Speed (speed-arm)\n" in text
    assert "| 1 |" in text and "| 2 |" in text and "| 3 |" not in text
    assert capsys.readouterr().out.count("written to") == 2

    benches = Path(report.__file__).parent
    writers = [f for f in sorted(benches.glob("*.py"))
               if f.name != "report.py" and "write_docs(" in f.read_text()]
    assert len(writers) >= 19
    for bench in writers:
        source = bench.read_text()
        assert "add_docs_args(p)" in source, bench.name
        assert "write_section(" not in source, bench.name  # only through write_docs
