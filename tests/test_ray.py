"""armorm.ray on a local Ray cluster the tests start (and stop): scoring and stage-1/2 embedding with Ray Data.

Each result from a pool of 2 actors must equal the single-process result bit
for bit, in input order; an actor killed mid-run (a test row makes it
SIGKILL itself once) must change nothing; a bad row must fail naming its id.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'armorm[ray]'); armorm.ray is untested")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

import armorm.ray as ar  # noqa: E402
from armorm import ArmoRMPipeline  # noqa: E402
from armorm.cli import main as cli_main  # noqa: E402
from armorm.tiny import make_tiny_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ACTORS = 2


def _descendants(pid: int) -> set:
    """Process ids below `pid` (from /proc), to check the cluster leaves nothing running."""
    children: dict = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _alive(pids: set) -> set:
    alive = set()
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    alive.add(p)
        except OSError:
            pass
    return alive


@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance of this test process (2 actors x 1 CPU + 1 CPU for reading and writing).

    Workers import armorm from this checkout; ray.shutdown() stops every
    process it started, which the teardown checks.
    """
    if ray.is_initialized():
        pytest.skip("a Ray instance is already running in this process")
    before = _descendants(os.getpid())
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(
        os.pathsep) if p])
    ray.init(address="local", num_cpus=ACTORS + 1, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    address = ray.get_runtime_context().gcs_address
    try:
        yield address
    finally:
        ours = _descendants(os.getpid()) - before
        ray.shutdown()
        deadline = time.monotonic() + 60
        while _alive(ours) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _alive(ours), f"Ray left processes running: {sorted(_alive(ours))}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("ray") / "tiny", datasets=True)


def _conversation_rows(tiny: Path, n: int = 40):
    """`n` rows with shuffled integer ids: messages, or prompt + response."""
    recs = [json.loads(line) for line in (tiny / "data" / "stage1.jsonl").read_text().splitlines()[:n]]
    ids = np.random.default_rng(3).permutation(n) * 7 + 100  # not sorted: the order must come from the input
    rows = []
    for i, (rid, r) in enumerate(zip(ids, recs)):
        if i % 3 == 2:
            rows.append({"id": int(rid), "prompt": r["messages"][0]["content"],
                         "response": r["messages"][1]["content"]})
        else:
            rows.append({"id": int(rid), "messages": r["messages"]})
    return rows


def _conversations(rows):
    return [r["messages"] if "messages" in r else
            [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]
            for r in rows]


def _struct_matrix(col) -> np.ndarray:
    """A struct column of float32 fields as a [rows, fields] array."""
    return np.stack([np.asarray(col.field(j).to_numpy(zero_copy_only=False), dtype=np.float32)
                     for j in range(col.type.num_fields)], axis=1)


def _same_bits(a, b) -> None:
    a, b = np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32)
    assert a.shape == b.shape
    np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


def _table(rows):
    """Rows as a pyarrow Table with every column any row has (from_pylist alone takes the first row's)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows])


def _write_parquet_parts(rows, directory: Path, parts: int) -> list:
    directory.mkdir()
    step = -(-len(rows) // parts)
    paths = []
    for k in range(parts):
        p = directory / f"part-{k}.parquet"
        pq.write_table(_table(rows[k * step:(k + 1) * step]), p)
        paths.append(str(p))
    return paths


def _check_scores(table, rows, tiny: Path) -> None:
    """`table` (the Ray output) against ArmoRMPipeline.score_batch in one process, bit for bit."""
    ref = ArmoRMPipeline(str(tiny), device_map="cpu", num_threads=1).score_batch(_conversations(rows))
    assert table["id"].to_pylist() == [r["id"] for r in rows]  # every row once, in input order
    _same_bits(table["score"].to_numpy(), ref.score)
    _same_bits(_struct_matrix(table["rewards"].combine_chunks()), ref.rewards)
    _same_bits(_struct_matrix(table["gating_output"].combine_chunks()), ref.gating_output)
    assert table["rewards"].type.names == list(ArmoRMPipeline(str(tiny), device_map="cpu").model.attributes)


def test_two_actors_score_as_one_process_bit_for_bit(cluster, tiny, tmp_path):
    rows = _conversation_rows(tiny)
    ds = ray.data.read_parquet(_write_parquet_parts(rows, tmp_path / "in", parts=3))
    scored = ar.score_dataset(ds, tiny, actors=ACTORS, batch_rows=5)
    # written as several files, whose sorted names give the rows in input order
    ar.write_rows(scored, str(tmp_path / "out"), "parquet", expected_ids=[r["id"] for r in rows])
    files = sorted((tmp_path / "out").iterdir())
    assert len(files) > 1
    _check_scores(pa.concat_tables([pq.read_table(f) for f in files]), rows, tiny)


def test_pairs_score_both_sides(cluster, tiny):
    recs = [json.loads(line) for line in (tiny / "data" / "pairs.jsonl").read_text().splitlines()[:12]]
    rows = [{"id": f"pair-{i}", **r} for i, r in enumerate(recs)]
    table = pa.concat_tables(ray.get(ar.score_dataset(ray.data.from_arrow(_table(rows)), tiny, actors=ACTORS,
                                                      batch_rows=4).to_arrow_refs()))
    assert table["id"].to_pylist() == [r["id"] for r in rows]
    rm = ArmoRMPipeline(str(tiny), device_map="cpu", num_threads=1)
    from armorm.train.stage2 import pair_conversations
    sides = [pair_conversations(r, r["id"]) for r in rows]
    for k, side in enumerate(("chosen", "rejected")):
        ref = rm.score_batch([s[k] for s in sides])
        _same_bits(table[f"{side}_score"].to_numpy(), ref.score)
        _same_bits(_struct_matrix(table[f"{side}_rewards"].combine_chunks()), ref.rewards)


def _dies_once(base: type, column: str, value, marker: str) -> type:
    """`base` whose actor kills its own process (SIGKILL: no cleanup, as a lost node would) when a batch holds
    `value` in `column`, the first time only (`marker` is created first, atomically)."""

    class DiesOnce(base):
        def __call__(self, batch):
            if value in batch[column].to_pylist():
                try:
                    fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    pass
                else:
                    os.close(fd)
                    os.kill(os.getpid(), signal.SIGKILL)
            return super().__call__(batch)

    return DiesOnce


def test_an_actor_killed_mid_run_changes_nothing(cluster, tiny, tmp_path):
    rows = _conversation_rows(tiny, 30)
    victim = rows[17]["id"]
    marker = str(tmp_path / "killed-once")

    DiesOnce = _dies_once(ar.Scorer, "id", victim, marker)
    ds = ray.data.from_arrow(_table(rows))
    table = pa.concat_tables(ray.get(ar.score_dataset(ds, tiny, actors=ACTORS, batch_rows=3,
                                                      scorer=DiesOnce).to_arrow_refs()))
    assert os.path.exists(marker), "the actor was not killed"
    _check_scores(table, rows, tiny)


def test_a_bad_row_fails_naming_its_id(cluster, tiny):
    rows = _conversation_rows(tiny, 12)
    rows = [dict(r, id=f"row-{r['id']}") for r in rows]
    rows[9] = {"id": "row-bad", "messages": [{"role": "user", "content": "no answer"}]}
    with pytest.raises(ValueError, match="row id='row-bad'.*assistant"):
        ar.score_dataset(ray.data.from_arrow(_table(rows)), tiny, actors=ACTORS, batch_rows=4).materialize()


def _single_machine_scores(tiny: Path, rows, tmp_path: Path) -> list:
    src, dst = tmp_path / "single-in.jsonl", tmp_path / "single-out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli_main(["score", "--model", str(tiny), "--input", str(src), "--output", str(dst), "--no-progress"]) == 0
    return dst.read_text().splitlines()


def test_cli_writes_what_the_single_machine_cli_writes(cluster, tiny, tmp_path):
    """`armorm score --ray` (a separate process joining the cluster): JSONL text identical to `armorm score`."""
    rows = _conversation_rows(tiny, 24)
    inp = tmp_path / "in"
    inp.mkdir()
    for k in range(2):  # two files: the output keeps the sorted file order
        (inp / f"part-{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[k * 12:(k + 1) * 12]))
    out = tmp_path / "scores"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-m", "armorm", "score", "--ray", "--ray-address", cluster,
                          "--model", str(tiny), "--input", str(inp / "*.jsonl"), "--output", str(out),
                          "--actors", str(ACTORS), "--batch-rows", "5", "--output-format", "jsonl"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr
    assert f"wrote {len(rows)} scores" in res.stderr
    lines = [line for f in sorted(out.iterdir()) for line in f.read_text().splitlines()]
    assert lines == _single_machine_scores(tiny, rows, tmp_path)


def test_cli_parquet_without_ids_numbers_the_rows(cluster, tiny, tmp_path, capsys):
    rows = [{k: v for k, v in r.items() if k != "id"} for r in _conversation_rows(tiny, 15)]
    src = tmp_path / "in.parquet"
    pq.write_table(_table(rows), src)
    out = tmp_path / "scores"
    assert cli_main(["score", "--ray", "--model", str(tiny), "--input", str(src), "--output", str(out),
                     "--actors", str(ACTORS), "--batch-rows", "4"]) == 0
    table = pq.read_table(sorted(out.iterdir()))
    _check_scores(table, [dict(r, id=i) for i, r in enumerate(rows)], tiny)
    # an existing output is kept unless --overwrite
    assert cli_main(["score", "--ray", "--model", str(tiny), "--input", str(src), "--output", str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


def test_cli_bad_row_is_one_line_and_writes_nothing(cluster, tiny, tmp_path, capsys):
    rows = _conversation_rows(tiny, 10)
    rows[6] = {"id": 4242, "prompt": "a prompt without a response"}
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "scores"
    assert cli_main(["score", "--ray", "--model", str(tiny), "--input", str(src), "--output", str(out),
                     "--actors", str(ACTORS), "--batch-rows", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["armorm: error: row id=4242: record has 'prompt' but no 'response' (or give 'messages')"], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # no output, no temporary directory


def test_cli_ray_option_errors(tmp_path, capsys):
    assert cli_main(["score", "--actors", "2", "--input", "x.jsonl"]) == 2
    assert capsys.readouterr().err.strip() == "armorm: error: --actors needs --ray"
    assert cli_main(["score", "--ray", "--input", str(tmp_path / "none-*.jsonl"), "--output", str(tmp_path / "o")]) == 2
    assert "matches none" in capsys.readouterr().err
    (tmp_path / "in.jsonl").write_text('{"id": 1, "prompt": "p", "response": "r"}\n')
    assert cli_main(["score", "--ray", "--model", str(tmp_path / "no-model"), "--input", str(tmp_path / "in.jsonl"),
                     "--output", str(tmp_path / "o")]) == 2  # checked before any Ray work
    assert capsys.readouterr().err.strip().splitlines() == [f"armorm: error: model directory {tmp_path}/no-model "
                                                             "does not exist"]


# ---------------------------------------------------------------------------- stage-1/2 embedding


def _prepare(stage: int, tiny: Path, dataset: Path, out: Path, *extra: str, ray_args=()) -> Path:
    args = [f"prepare-stage{stage}", "--model", str(tiny), "--dataset", str(dataset), "--output", str(out),
            "--no-progress", *extra, *ray_args]
    assert cli_main(args) == 0
    files = sorted(out.glob("*.safetensors"))
    assert len(files) == 1 and not [p for p in out.iterdir() if p.name.startswith(".")]
    return files[0]


def test_stage1_on_ray_writes_the_single_machine_file(cluster, tiny, tmp_path):
    data = tiny / "data" / "stage1.jsonl"
    one = _prepare(1, tiny, data, tmp_path / "one", "--chunk-rows", "48")
    ray_file = _prepare(1, tiny, data, tmp_path / "ray", "--chunk-rows", "48",
                        ray_args=("--ray", "--actors", str(ACTORS)))
    assert ray_file.name == one.name
    assert ray_file.read_bytes() == one.read_bytes()  # rows, order, values and metadata
    # complete: a second run returns it without starting a job
    assert _prepare(1, tiny, data, tmp_path / "ray", "--chunk-rows", "48",
                    ray_args=("--ray", "--actors", str(ACTORS))).read_bytes() == one.read_bytes()


def test_stage2_on_ray_writes_the_single_machine_file(cluster, tiny, tmp_path):
    """Pairs, some too long for --seq-len (unshuffled: a whole chunk of them; shuffled), then RewardBench's
    ids and subsets."""
    recs = [json.loads(line) for line in (tiny / "data" / "pairs.jsonl").read_text().splitlines()[:40]]
    long = {"role": "assistant", "content": "long " * 80}
    for r in recs[10:20]:
        r["rejected"] = r["rejected"][:1] + [long]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in recs))
    for data, extra in ((pairs, ("--chunk-rows", "10", "--seq-len", "300", "--no-shuffle")),
                        (pairs, ("--chunk-rows", "10", "--seq-len", "300", "--seed", "5", "--name", "shuffled")),
                        (tiny / "data" / "rewardbench.jsonl", ("--chunk-rows", "25", "--no-shuffle"))):
        one = _prepare(2, tiny, data, tmp_path / f"one-{data.stem}-{len(extra)}", *extra)
        ray_file = _prepare(2, tiny, data, tmp_path / f"ray-{data.stem}-{len(extra)}", *extra,
                            ray_args=("--ray", "--actors", str(ACTORS)))
        assert ray_file.read_bytes() == one.read_bytes()


def test_an_embedding_actor_killed_mid_run_changes_nothing(cluster, tiny, tmp_path):
    data = tiny / "data" / "stage1.jsonl"
    one = _prepare(1, tiny, data, tmp_path / "one", "--chunk-rows", "40")
    marker = str(tmp_path / "killed-once")

    DiesOnce = _dies_once(ar.Embedder, "chunk", 3, marker)
    path = ar.prepare_dataset(1, tiny, data, tmp_path / "ray", actors=ACTORS, chunk_rows=40, embedder=DiesOnce,
                              progress=False, quiet=True)
    assert os.path.exists(marker), "the actor was not killed"
    assert Path(path).read_bytes() == one.read_bytes()


def test_stage1_bad_row_on_ray_names_it(cluster, tiny, tmp_path, capsys):
    lines = (tiny / "data" / "stage1.jsonl").read_text().splitlines()[:30]
    rec = json.loads(lines[22])
    rec["helpsteer-helpfulness"] = "high"
    lines[22] = json.dumps(rec)
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n")
    args = ["prepare-stage1", "--model", str(tiny), "--dataset", str(data), "--output", str(tmp_path / "out"),
            "--chunk-rows", "8", "--no-progress"]
    assert cli_main(args) == 2
    single = capsys.readouterr().err.strip().splitlines()[-1]
    assert "row 22 (bad.jsonl line 23): objective 'helpsteer-helpfulness'" in single
    assert cli_main(args + ["--restart", "--ray", "--actors", str(ACTORS)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == single


def test_files_written_out_of_order_are_put_in_row_order(tmp_path):
    """Ray 2.60's writers may number files out of block order: the files are renamed by their rows."""
    for name, ids in (("b_000000-0.parquet", [5, 6, 7]), ("b_000001-0.parquet", [0, 1, 2, 3, 4]),
                      ("b_000002-0.parquet", [8])):
        pq.write_table(pa.table({"id": ids}), tmp_path / name)
    ar._put_files_in_row_order(str(tmp_path), "parquet", "id", list(range(9)), "OUT")
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == ["part-000000.parquet", "part-000001.parquet", "part-000002.parquet"]
    assert [v for f in files for v in pq.read_table(f)["id"].to_pylist()] == list(range(9))
    pq.write_table(pa.table({"id": [9]}), tmp_path / "extra.parquet")  # a row twice / not in the input
    with pytest.raises(RuntimeError, match="10 of 9 rows"):
        ar._put_files_in_row_order(str(tmp_path), "parquet", "id", list(range(9)), "OUT")


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_rows_out_of_order_across_files_are_rewritten_in_order(tmp_path, fmt):
    """Rows interleaved across files (no file of consecutive rows to rename) are rewritten in input order,
    every column with its row, the files' row counts kept; a lost or doubled row is still an error."""
    layout = {"a": [3, 0, 7], "b": [1, 6, 2, 8], "c": [5, 4]}
    for name, ids in layout.items():
        rows = [{"id": f"r{i}", "score": i * 0.5, "n": [i, i + 1]} for i in ids]
        if fmt == "parquet":
            pq.write_table(pa.Table.from_pylist(rows), tmp_path / f"{name}.parquet")
        else:
            (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    expected = [f"r{i}" for i in range(9)]
    ar._put_files_in_row_order(str(tmp_path), fmt, "id", expected, "OUT")
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == [f"part-{k:06d}.{fmt}" for k in range(3)]
    read = [pq.read_table(f).to_pylist() if fmt == "parquet" else [json.loads(x) for x in f.read_text().splitlines()]
            for f in files]
    assert sorted(len(r) for r in read) == [2, 3, 4]
    assert [r for part in read for r in part] == [{"id": f"r{i}", "score": i * 0.5, "n": [i, i + 1]}
                                                  for i in range(9)]
    with pytest.raises(RuntimeError, match="differ from the input.s at row 8"):  # r9 never written, r8 not asked
        ar._put_files_in_row_order(str(tmp_path), fmt, "id", expected[:8] + ["r9"], "OUT")
