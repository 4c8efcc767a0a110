"""Fuzz the C safetensors header parser with libFuzzer (ASan + UBSan).

    python tests/fuzz/run_fuzz.py --seconds 60            # what CI runs
    python tests/fuzz/run_fuzz.py --runs 1000000          # the million-input run

Seed corpus: the real files of tiny checkpoints written by transformers /
safetensors (what tests generate), their headers alone, and truncated and
bit-flipped copies. Builds tests/c's harness with clang (installs nothing:
fails clearly when clang is missing). Exits non-zero on any crash, leak,
timeout or sanitizer report, and prints the fuzzer's final stats line.
"""
from __future__ import annotations

import argparse
import random
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def seed_corpus(out: Path) -> int:
    from checkpoints import make_armorm, make_backbone
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    n = 0
    with tempfile.TemporaryDirectory() as tmp:
        make_armorm(Path(tmp) / "a", hidden=16, heads=2, kv_heads=1, inter=16, layers=1, gating_hidden=8,
                    num_objectives=3, vocab=32, shards=2)
        make_backbone(Path(tmp) / "b", dtype="bfloat16", hidden=16, heads=2, kv_heads=1, inter=16, layers=1, vocab=32)
        for f in sorted(Path(tmp).rglob("*.safetensors")):
            data = f.read_bytes()
            hlen = int.from_bytes(data[:8], "little")
            variants = [data, data[:8 + hlen], data[:8 + hlen] + b"\0" * 64]
            for cut in (1, 7, 8, 9, 8 + hlen // 2, 8 + hlen - 1, len(data) - 1):
                variants.append(data[:cut])
            for _ in range(20):
                b = bytearray(data[:8 + hlen + 64])
                for _ in range(rng.randint(1, 4)):
                    i = rng.randrange(len(b))
                    b[i] ^= 1 << rng.randrange(8)
                variants.append(bytes(b))
            for v in variants:
                (out / f"seed-{n:04d}").write_bytes(v)
                n += 1
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--runs", type=int, default=0, help="stop after this many inputs (0: time limit only)")
    ap.add_argument("--workdir", default=None,
                    help="keep the corpus and log here (default: a temporary directory, removed after a clean run)")
    args = ap.parse_args()
    if not shutil.which("clang"):
        print("run_fuzz: clang is not installed (apt-get install clang)", file=sys.stderr)
        return 2
    subprocess.run(["make", "-s", "-C", str(ROOT / "tests" / "c"), "fuzz"], check=True)
    binary = ROOT / "tests" / "c" / "build" / "fuzz_safetensors"
    work = Path(args.workdir or tempfile.mkdtemp(prefix="armorm-fuzz-"))
    corpus = work / "corpus"
    seeds = seed_corpus(work / "seeds")
    corpus.mkdir(parents=True, exist_ok=True)
    cmd = [str(binary), str(corpus), str(work / "seeds"), f"-max_total_time={args.seconds}",
           "-max_len=8192", "-timeout=5", "-rss_limit_mb=2048", f"-artifact_prefix={work}/",
           "-print_final_stats=1"]
    if args.runs:
        cmd.append(f"-runs={args.runs}")
    print(f"run_fuzz: {seeds} seeds, corpus in {corpus}\n+ {' '.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    (work / "fuzz.log").write_text(log)
    execs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", log)
    secs = re.findall(r"Done (\d+) runs in (\d+) second", log)
    print(f"run_fuzz: exit {proc.returncode}, executed {execs[-1] if execs else '?'} inputs"
          + (f" in {secs[-1][1]} s" if secs else ""))
    if proc.returncode != 0:
        print(log[-4000:], file=sys.stderr)
        print(f"run_fuzz: the crash input and the log are kept in {work}", file=sys.stderr)
    elif not args.workdir:  # a clean run leaves nothing behind; --workdir keeps the corpus
        shutil.rmtree(work, ignore_errors=True)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
