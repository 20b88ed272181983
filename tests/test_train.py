"""train.py end to end: mesh shapes, GRPO advantages, exact resumes after kills, preemption and
retrieval outages, failures that lose no step, a gs:// run folder, two processes."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import SUBPROCESS_ENV
from etils import epath
from etils.epath import testing as epath_testing
from retrieval_testing import StandInServer
from safetensors.numpy import load_file

import rollout as rollout_cli
import train
from tspo_jax import cli, data, hf_io, learner, protocol, rollout, runtime
from tspo_jax.config import Config

ROOT = Path(__file__).resolve().parents[1]
# Gold answers that the briefly warm-started test policy often writes and retrieves (relation
# words), so that groups have mixed outcomes (F1) and FOLR hits: the advantages are not all
# zero, and comparisons of losses and gradients below are not vacuous.
RELATION_WORDS = ["born", "author", "founder", "based", "city", "country"]


@pytest.fixture(scope="module")
def questions(small_world, tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "questions.jsonl"
    with open(path, "w") as f:
        for ex in data.load_examples(small_world.train)[:24]:
            f.write(json.dumps({"question": ex.question, "golden_answers": RELATION_WORDS}) + "\n")
    return path


def args(small_world, small_policy, questions, out, *extra, url=None):
    """The small config; retrieval by BM25 over the small world's corpus, or from the server
    at ``url``."""
    retriever = ("--retriever-url", url) if url else ("--corpus", str(small_world.corpus))
    return [
        *("--model", str(small_policy), "--data", str(questions)),
        *retriever,
        *("--out-dir", str(out)),
        *("--prompts-per-step", "8", "--mini-batch", "8", "--group-size", "4"),
        *("--max-turns", "2", "--max-new-tokens", "12", "--max-obs-tokens", "80"),
        *("--max-context", "384", "--outcome", "f1", "--kl-coef", "0.01"),
        *("--eval-every", "0", "--plot", "false", "--seed", "3"),
        # JAX's cache setting left as it is: none in-process, the session's in subprocesses.
        *("--compile-cache", "off"),
        *extra,
    ]


def test_mesh_shapes_give_the_same_losses(small_world, small_policy, questions, tmp_path):
    """(8, 1) and (1, 8) on 8 fake devices, the second with its rollouts in waves of two
    groups, a paged KV cache (pages of 16 tokens, a call at most a page per row) and the train
    state in host memory (pinned_host) while they run: same rollouts, losses and gradient
    norms (test_learner compares the loss and gradients of every mesh shape, (4, 2) included,
    on fixed batches).

    The learning rate is tiny so that step 2 samples from (numerically) the same policy on
    every mesh: AdamW moves a parameter by about lr whatever the size of its gradient."""
    runs = {}
    for data_axis, fsdp_axis in ((8, 1), (1, 8)):
        out = tmp_path / f"mesh_{data_axis}x{fsdp_axis}"
        mesh = ("--mesh-data", str(data_axis), "--mesh-fsdp", str(fsdp_axis))
        if fsdp_axis == 8:  # and rollouts in 4 waves of 8 rows (2 groups) instead of one,
            mesh += ("--rollout-batch", "8", "--offload-state", "on")  # the state in host memory
            mesh += ("--kv-cache", "paged", "--page-size", "16")
        result = train.main(
            args(small_world, small_policy, questions, out, *mesh, "--steps", "2", "--lr", "1e-7")
        )
        runs[(data_axis, fsdp_axis)] = result["history"]
        assert (out / "checkpoints" / "2").is_dir() and (out / "metrics.jsonl").exists()
        assert (out / "hf" / "step_2" / "model.safetensors").exists()
    reference = runs[(8, 1)]
    assert all(r["zero_adv_group_frac"] < 1 for r in reference)  # the losses are not trivial
    assert all(abs(r["pg_loss"]) > 0 and r["grad_norm"] > 0 for r in reference)
    for shape, history in runs.items():
        for r, ref in zip(history, reference, strict=True):
            assert r["response_tokens"] == ref["response_tokens"], shape
            for key in ("loss", "pg_loss", "ref_kl", "grad_norm", "clip_frac", "reward"):
                np.testing.assert_allclose(r[key], ref[key], rtol=2e-5, atol=1e-8, err_msg=key)


def test_grpo_logs_grpo_advantages(small_world, small_policy, questions, tmp_path):
    """With --algo grpo the logged advantages are the group-normalized outcomes, every turn.
    With --dynamic-sampling the update's groups all have mixed outcomes, but for as many tied
    ones as the metrics row says were short (filled in after --max-draws batches)."""
    out = tmp_path / "grpo"
    grpo = ("--algo", "grpo", "--log-samples", "1", "--steps", "1", "--dynamic-sampling")
    train.main(args(small_world, small_policy, questions, out, *grpo, "--max-draws", "3"))
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 8 * 4
    (metrics,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert (
        metrics["groups_drawn"] in (8, 16, 24)
        and metrics["rollouts"] == 4 * metrics["groups_drawn"]
    )
    outcomes = np.array([r["outcome"] for r in rows]).reshape(8, 4)
    tied = int(np.sum(outcomes.max(axis=1) == outcomes.min(axis=1)))
    assert tied == metrics["groups_short"]
    assert tied == 0 or metrics["groups_drawn"] == 24  # short only once every draw was spent
    checked = 0
    for g in range(8):
        group = rows[4 * g : 4 * g + 4]
        o = np.array([r["outcome"] for r in group], np.float64)
        expected = np.zeros(4) if o.max() == o.min() else (o - o.mean()) / (o.std(ddof=1) + 1e-6)
        for r, a in zip(group, expected, strict=True):
            np.testing.assert_allclose(r["advantages"], [a] * r["num_turns"], rtol=1e-5, atol=1e-6)
        checked += o.max() > o.min()
    assert checked > 0  # some groups had mixed outcomes, so some advantages are non-zero
    # The same step with TSPO gives hits extra credit: different advantages somewhere.
    assert any(r["first_hit"] >= 0 for r in rows)


def expected_advantages(group, credit, eligible, answer_stage, alpha=0.5, eps=1e-6):
    """Eq. F / Eq. A of TSPO.md for one group of samples.jsonl rows, FOLR applying (as under
    --folr-groups all), as a plain loop."""
    may_earn = [eligible == "any" or r["finish"] == "answer" for r in group]
    hits = [r["first_hit"] if e else -1 for r, e in zip(group, may_earn, strict=True)]
    rewards = []
    for r, h in zip(group, hits, strict=True):  # Eq. F
        o, turns = r["outcome"], range(r["num_turns"])
        credited = [k <= h if credit == "search-stage" else k == h for k in turns]
        rewards.append([o + (1 - o) * alpha * c for c in credited])
    R, o = np.array([max(x) for x in rewards]), np.array([r["outcome"] for r in group])
    grpo = np.zeros(len(o)) if o.max() == o.min() else (o - o.mean()) / (o.std(ddof=1) + eps)
    out = []
    for g, (r, x, h) in enumerate(zip(group, rewards, hits, strict=True)):
        A = (
            [0.0] * len(x)
            if R.max() == R.min()
            else (np.array(x) - R.mean()) / (R.std(ddof=1) + eps)
        )
        answering = answer_stage == "grpo" and r["finish"] == "answer"
        stage = [0 <= h < k or (answering and k == len(x) - 1) for k in range(len(x))]
        stage = [s and answer_stage != "outcome" for s in stage]
        answer = 0.0 if answer_stage == "neutral" else grpo[g]
        out.append([answer if s else a for a, s in zip(A, stage, strict=True)])
    return out


@pytest.mark.parametrize(
    "credit,eligible,answer_stage",
    [("hit-turn", "any", "neutral"), ("search-stage", "answered", "grpo")],
)
def test_folr_options_reach_the_logged_advantages(
    small_world, small_policy, questions, tmp_path, credit, eligible, answer_stage
):
    """--folr-credit, --folr-eligible and --answer-stage (with --folr-groups all, so that FOLR
    applies in every group): the logged advantages are Eq. F / Eq. A of TSPO.md under those
    options, recomputed here from each group's outcomes, first hits, turns and finishes."""
    out = tmp_path / "options"
    options = ("--folr-credit", credit, "--folr-eligible", eligible, "--answer-stage", answer_stage)
    options += ("--folr-groups", "all", "--max-turns", "3", "--log-samples", "1", "--steps", "1")
    train.main(args(small_world, small_policy, questions, out, *options))
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 8 * 4
    nonzero = 0
    for g in range(8):
        group = rows[4 * g : 4 * g + 4]
        expected = expected_advantages(group, credit, eligible, answer_stage)
        for r, x in zip(group, expected, strict=True):
            np.testing.assert_allclose(r["advantages"], x, rtol=1e-5, atol=1e-6)
            nonzero += any(a != 0 for a in x)
    assert nonzero > 0  # some group had a signal: the comparison is not vacuous


def devices(n):
    """A subprocess environment with ``n`` fake CPU devices (the session's flags kept)."""
    return {
        "XLA_FLAGS": f"{SUBPROCESS_ENV['XLA_FLAGS']} --xla_force_host_platform_device_count={n}"
    }


def _run(argv, env=None, **kwargs):
    env = {**os.environ, **SUBPROCESS_ENV, **(env or {})}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *argv],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def _weights(folder):
    return load_file(str(Path(folder) / "model.safetensors"))


# Run under a `python -c`: train.py as a script (its `__main__` block), with holds that let a test
# act at exact moments, as a slow or stuck write to storage, or a slow exit, would let things
# happen. argv[1] is a folder of marker files: orbax's commit of the checkpoint of step N (the
# rename of its temporary folder) touches "saving-N" and waits for "save-N"; once the script has
# returned, the process touches "returned" and waits for "exit" before it exits.
HOLD_SAVE_AND_EXIT = """
import asyncio, pathlib, runpy, sys, time
from orbax.checkpoint._src.path import atomicity

commit, marks = atomicity.AtomicRenameTemporaryPath.finalize, pathlib.Path(sys.argv[1])

def hold(name, go):
    (marks / name).touch()
    while not (marks / go).exists():
        time.sleep(0.05)

async def held_commit(self, *args, **kwargs):
    step = self.get_final().name  # a step's folder, or one of its items'
    if step.isdigit():
        hold(f"saving-{step}", f"save-{step}")
    return await commit(self, *args, **kwargs)

atomicity.AtomicRenameTemporaryPath.finalize = held_commit
sys.argv = ["train.py", *sys.argv[2:]]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    hold("returned", "exit")
"""


_STARTED = []  # processes of _start, killed after each test if still there (they ignore SIGTERM)


def _start(argv, log, code=None):
    """train.py (or ``python -c code``) in a subprocess, its output in the file ``log``; runs
    share the session's persistent compilation cache (tests/conftest.py; the same programs:
    only faster)."""
    env = {**os.environ, **SUBPROCESS_ENV}
    command = ["-c", code] if code else [str(ROOT / "train.py")]
    with open(log, "w") as f:
        _STARTED.append(
            subprocess.Popen(
                [sys.executable, *command, *argv],
                cwd=ROOT,
                env=env,
                stdout=f,
                stderr=subprocess.STDOUT,
            )
        )
    return _STARTED[-1]


@pytest.fixture(autouse=True)
def _no_process_left():
    yield
    while _STARTED:
        process = _STARTED.pop()
        if process.poll() is None:
            process.kill()
            process.wait()


def _wait_for(condition, process, what):
    deadline = time.time() + 600
    while not condition() and process.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert condition(), f"no {what}: rc {process.poll()}"


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_is_exact_after_kills_preemption_and_outages(
    small_world, small_policy, questions, tmp_path, capsys
):
    """4 steps straight (run a) == the same 4 steps through what a long run meets (run b):

    b1  the retrieval server hangs up on step 1's search and refuses connections for 1.5 s: the
        run rides it out; then SIGKILL while the asynchronous save of step 2 has not committed:
        the checkpoint of step 1 stays the latest;
    b2  --resume; the server goes down for good in step 3's rollout: the run saves the state of
        the step it completed, and ends with one line saying how to resume;
    b3  --resume, the server back; SIGTERM during a rollout, again during the save, and again
        once train.py has returned: the step in progress finishes, is saved, and the process
        exits 0 with one line;
    b4  --resume: the rest.
    Parameters equal bit for bit; metrics.jsonl has each step once, with a's values.
    """
    server = StandInServer()
    common = ("--steps", "4", "--lr", "1e-3", "--retriever-max-wait", "4")
    run_a = args(small_world, small_policy, questions, tmp_path / "a", *common, url=server.url)
    run_b = lambda *extra: args(
        small_world, small_policy, questions, tmp_path / "b", *common, *extra, url=server.url
    )
    out, log = tmp_path / "b", lambda name: tmp_path / f"{name}.log"
    try:
        straight = _start(run_a, log("a"))
        assert straight.wait(timeout=600) == 0, log("a").read_text()
        assert len(server.requests) == 5  # the start-up check, then a search in every step

        # b1: an outage it rides out, then SIGKILL with the save of step 2 in flight.
        server.requests, server.outages = [], {2: 1.5}
        marks = tmp_path / "marks"
        marks.mkdir()
        (marks / "save-1").touch()  # step 1 commits, step 2 hangs
        b1 = run_b("--checkpoint-every", "1", "--async-checkpoint", "on")
        killed = _start([str(marks), *b1], log("b1"), code=HOLD_SAVE_AND_EXIT)
        saving = marks / "saving-2"
        rows_ahead = lambda: saving.exists() and len(_rows(out)) >= 2  # row 2 is written
        _wait_for(rows_ahead, killed, "save of step 2")
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        text = log("b1").read_text()
        assert "Remote end closed connection" in text and "Connection refused" in text, text
        assert (out / "checkpoints" / "1").is_dir() and not (out / "checkpoints" / "2").exists()
        assert list((out / "checkpoints").glob("2.orbax-checkpoint-tmp*"))  # never committed
        assert [r["step"] for r in _rows(out)] == [1, 2]  # 2: ahead of its checkpoint

        # A checkpoint of another config is refused with a clear message.
        with pytest.raises(SystemExit) as exit_info:
            cli.run(train.main, run_b("--resume", "--clip-high", "0.3"))
        assert exit_info.value.code == 2 and "made with another config" in capsys.readouterr().err

        # b2: the server goes down for good at the second search after the start-up check.
        server.requests, server.outages = [], {3: None}
        outage = _start(run_b("--resume"), log("b2"))
        assert outage.wait(timeout=600) == 2, log("b2").read_text()
        text = log("b2").read_text()
        assert "resumed from the checkpoint of step 1" in text and "Traceback" not in text
        (error,) = [line for line in text.splitlines() if "error:" in line]
        saved = int(re.search(r"the state after step (\d+) is saved", error).group(1))
        assert re.fullmatch(
            re.escape(f"train.py: error: retrieval server {server.url} unreachable for ")
            + r"\d+ s \(\d attempts; last: .*Connection refused\); "
            + re.escape(f"the state after step {saved} is saved in {out / 'checkpoints'}; ")
            + "resume with --resume",
            error,
        ), error
        assert saved >= 2 and (out / "checkpoints" / str(saved)).is_dir()
        assert [r["step"] for r in _rows(out)] == list(range(1, saved + 1))

        # b3: SIGTERM during the rollout of the first step after the resume, another during
        # the save of that step, a third after the run has said it was preempted.
        server.outages, server.requests = {}, []
        server.up()
        step = saved + 1
        preempted = _start([str(marks), *run_b("--resume")], log("b3"), HOLD_SAVE_AND_EXIT)
        searching = lambda: len(server.requests) >= 2  # the start-up check, then a search
        _wait_for(searching, preempted, "the first search")
        preempted.send_signal(signal.SIGTERM)
        _wait_for((marks / f"saving-{step}").exists, preempted, f"the save of step {step}")
        preempted.send_signal(signal.SIGTERM)
        _wait_for(lambda: "still stopping" in log("b3").read_text(), preempted, "2nd notice")
        (marks / f"save-{step}").touch()
        _wait_for((marks / "returned").exists, preempted, "the end of train.py")
        preempted.send_signal(signal.SIGTERM)
        time.sleep(0.2)  # time for a signal to kill it
        (marks / "exit").touch()
        assert preempted.wait(timeout=600) == 0, log("b3").read_text()
        text = log("b3").read_text()
        assert "Traceback" not in text, text
        assert text.strip().splitlines()[-1] == (
            f"preempted at step {step} of 4: its checkpoint is saved in {out / 'checkpoints'}; "
            "continue with --resume"
        )
        assert (out / "checkpoints" / str(step)).is_dir()

        # b4: the rest, to the export of step 4.
        resumed = _start(run_b("--resume"), log("b4"))
        assert resumed.wait(timeout=600) == 0, log("b4").read_text()
        assert f"resumed from the checkpoint of step {step}" in log("b4").read_text()
    finally:
        server.close()
    a, b = _weights(tmp_path / "a" / "hf" / "step_4"), _weights(out / "hf" / "step_4")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    # The run did learn something: the weights moved from the warm start.
    start = _weights(small_policy)
    assert any(not np.array_equal(a[n], start[n]) for n in start)
    # Each step's metrics once, as in the straight run (times aside).
    rows_a, rows_b = _rows(tmp_path / "a"), _rows(out)
    assert [r["step"] for r in rows_b] == [r["step"] for r in rows_a] == [1, 2, 3, 4]
    for ra, rb in zip(rows_a, rows_b, strict=True):
        same = lambda r: {k: v for k, v in r.items() if not k.startswith(("time_", "tokens_"))}
        assert same(ra) == same(rb)


def test_chaos_soak_with_a_fixed_seed_loses_nothing(
    small_world, small_policy, questions, tmp_path, capsys, monkeypatch
):
    """bench.chaos on the small config: 3 faults (kills, preemptions, outages of the retrieval
    server) at random moments of a 4-step run, each survived; the last step's parameters and
    every metrics row are the straight run's."""
    from bench import chaos

    for name, value in SUBPROCESS_ENV.items():  # train.py's subprocesses: one device each,
        monkeypatch.setenv(name, value)  # the session's compilation cache
    train_argv = args(small_world, small_policy, questions, tmp_path / "unused", "--lr", "1e-3")
    budget = ("--retry-budget", "2", "--out", str(tmp_path / "chaos"))
    code = chaos.main(["--seed", "0", "--faults", "3", "--steps", "4", *budget, "--", *train_argv])
    out = capsys.readouterr().out
    assert re.fullmatch(
        r"chaos: 3 faults \(\d kills, \d terms, \d outages\), final params identical: yes, "
        r"metrics rows once each: yes, lost steps: 0",
        out.strip().splitlines()[-1],
    ), out
    assert code == 0, out


def fake_evaluate(em):
    """A stand-in for train.eval_metrics: the eval_* metrics with every value ``em``."""
    keys = ("em", "f1", "turns", "searches", "answer_rate", "folr_hit_rate")
    return lambda run, params: {f"eval_{k}": em for k in keys}


def test_a_failed_evaluation_or_export_loses_no_step(
    small_world, small_policy, questions, tmp_path, monkeypatch
):
    """The held-out file vanishes during the evaluation of step 1 (no checkpoint is due): step 1
    is saved before the error ends the run. --resume evaluates step 1, runs step 2, whose
    checkpoint is written before its export; the export fails (disk full). --resume again
    exports step 2. metrics.jsonl ends with both steps, each evaluated once."""
    out = tmp_path / "run"
    argv = args(small_world, small_policy, questions, out, "--steps", "2", "--eval-every", "1")
    argv += ["--eval-data", str(small_world.heldout), "--checkpoint-every", "0"]

    calls = []

    def vanished(run, params):  # after the evaluation of step 0
        calls.append(run)
        if len(calls) > 1:
            raise FileNotFoundError("heldout.jsonl: no such file")
        return fake_evaluate(0.5)(run, params)

    monkeypatch.setattr(train, "eval_metrics", vanished)
    with pytest.raises(FileNotFoundError) as error:
        train.main(argv)
    resume = f"the state after step 1 is saved in {out / 'checkpoints'}; resume with --resume"
    assert error.value.__notes__ == [resume]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["1"]

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train, "eval_metrics", fake_evaluate(0.5))
    monkeypatch.setattr(hf_io, "save_hf", disk_full)
    with pytest.raises(OSError, match="No space left") as error:
        train.main([*argv, "--resume"])
    assert error.value.__notes__ == [resume.replace("step 1", "step 2")]
    assert (out / "checkpoints" / "2").is_dir()
    assert not (out / "hf" / "step_2" / "config.json").exists()  # an incomplete export

    monkeypatch.undo()
    monkeypatch.setattr(train, "eval_metrics", fake_evaluate(0.75))  # must not be called
    train.main([*argv, "--resume"])
    assert (out / "hf" / "step_2" / "config.json").exists()
    rows = _rows(out)
    evaluated = [(r["step"], r["eval_em"], "reward" in r) for r in rows]
    assert evaluated == [(0, 0.5, False), (1, 0.5, True), (2, 0.5, True)]


def test_a_gs_out_dir_stays_a_url(small_world, small_policy, questions, tmp_path, monkeypatch):
    """--out-dir gs://bucket/run: config, metrics, samples, plot, checkpoints and the HF export
    all go to the URL through etils' epath (here redirected to a local folder, so that no
    network is needed); nothing lands in a local "gs:" folder."""
    bucket = tmp_path / "bucket"

    def local(path):
        text = os.fspath(path)
        return text.replace("gs://bucket", str(bucket), 1) if text.startswith("gs://") else path

    def redirect(original, path, *args, **kwargs):
        return original(local(path), *map(local, args), **kwargs)

    given = []
    manager_init = ocp.CheckpointManager.__init__

    def recording_init(self, directory, *args, **kwargs):
        given.append(directory)
        manager_init(self, epath.Path(local(directory)), *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "__init__", recording_init)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    backend = "copy exists glob isdir listdir makedirs mkdir open remove rename replace rmtree stat"
    with epath_testing.mock_epath(**dict.fromkeys([*backend.split(), "walk"], redirect)):
        run = ("--steps", "1", "--log-samples", "1", "--plot", "true")
        train.main(args(small_world, small_policy, questions, "gs://bucket/run", *run))
        config, params = hf_io.load_hf(str(bucket / "run" / "hf" / "step_1"))
        hf_io.save_hf("gs://bucket/copy", config, params)  # save_hf itself takes a URL too
    assert [(type(d), os.fspath(d)) for d in given] == [
        (type(epath.Path("gs://b")), "gs://bucket/run/checkpoints")
    ]
    out = bucket / "run"
    assert json.loads((out / "config.json").read_text())["out_dir"] == "gs://bucket/run"
    assert [r["step"] for r in _rows(out)] == [1]
    assert len((out / "samples.jsonl").read_text().splitlines()) == 8 * 4
    assert (out / "metrics.png").read_bytes().startswith(b"\x89PNG")
    assert (out / "checkpoints" / "1").is_dir()
    export = sorted(p.name for p in (out / "hf" / "step_1").iterdir())
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= set(export)
    copy = (bucket / "copy" / "model.safetensors").read_bytes()
    assert copy == (out / "hf" / "step_1" / "model.safetensors").read_bytes()
    assert list((tmp_path / "cwd").iterdir()) == []


def test_retriever_checked_before_the_model_loads(small_world, questions, tmp_path, capsys):
    """A bad --retriever-url stops train.py and rollout.py with one line before the model loads
    (the --model folder does not exist: its error would come first otherwise)."""
    server = StandInServer()
    with socket.socket() as s:  # a port that nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/retrieve"
    no_model = tmp_path / "no_model"
    cases = [
        (server.url.removesuffix("/retrieve"), "ok", "wrong path? Search-R1's server answers"),
        ("127.0.0.1:8000/retrieve", "ok", "is not an http:// or https:// URL"),
        (server.url, "html", "gave an answer not in Search-R1's shape"),
        (closed, "ok", f"retrieval server {closed} unreachable for 0 s (1 attempt; last: "),
    ]
    try:
        for url, mode, needle in cases:
            server.mode = mode
            budget = ("--retriever-max-wait", "0")
            train_argv = args(small_world, no_model, questions, tmp_path / "o", *budget, url=url)
            eval_argv = ["--model", str(no_model), "--data", str(questions), *budget]
            for main, argv in ((train.main, train_argv), (rollout_cli.main, eval_argv)):
                if main is rollout_cli.main:
                    argv += ["--retriever-url", url]
                with pytest.raises(SystemExit) as exit_info:
                    cli.run(main, argv)
                err = capsys.readouterr().err
                (line,) = [line for line in err.splitlines() if "error:" in line]
                assert exit_info.value.code == 2 and needle in line, err  # not the model's
                assert "Traceback" not in err
        assert len(server.requests) == 2 * 2  # wrong path and html: one check each, per script
    finally:
        server.close()


@pytest.fixture(autouse=True)
def _sigterm_handler_put_back():
    """train.main puts back the SIGTERM handler it found, whether it returns or raises."""
    handler = signal.getsignal(signal.SIGTERM)
    yield
    assert signal.getsignal(signal.SIGTERM) is handler


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(small_world, small_policy, questions, tmp_path):
    """Two CPU processes (2 devices each, a localhost coordinator), each rolling out its share
    of the prompts, reach the same losses and parameters after 2 steps as one process with 4
    devices and the same global batch.

    Sampling runs one batch of rows in one process and two half batches in two, whose logits
    differ in the last float bits; a near-tie between two tokens could then sample differently
    (it does at step 2 with --seed 3 on this world), so this test uses a seed without one."""
    common = ("--steps", "2", "--lr", "1e-4", "--micro-batch", "4", "--seed", "4")
    one = _run(
        args(small_world, small_policy, questions, tmp_path / "one", *common),
        env=devices(4),
    )
    assert one.wait(timeout=600) == 0, one.stdout.read()
    port = _free_port()
    distributed = ("--distributed", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2")
    procs = [
        _run(
            args(
                small_world,
                small_policy,
                questions,
                tmp_path / "two",
                *common,
                *distributed,
                f"--process-id={i}",
            ),
            env=devices(2),
        )
        for i in range(2)
    ]
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stdout.read()
    read = lambda run: [
        json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
    ]
    one_metrics, two_metrics = read("one"), read("two")
    assert len(one_metrics) == len(two_metrics) == 2
    assert any(r["zero_adv_group_frac"] < 1 for r in one_metrics)
    for a, b in zip(one_metrics, two_metrics, strict=True):
        for key in (
            "reward",
            "response_tokens",
            "loss",
            "pg_loss",
            "grad_norm",
            "ref_kl",
            "ratio_max",
        ):
            np.testing.assert_allclose(b[key], a[key], rtol=2e-5, atol=1e-8, err_msg=key)
    a, b = (
        _weights(tmp_path / "one" / "hf" / "step_2"),
        _weights(tmp_path / "two" / "hf" / "step_2"),
    )
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_a_run_that_stops_answering_says_so_once():
    """runtime.stops_answering: a line once the last 10 steps all answered less than half as
    often as the first, naming what happens and the options that change it; not again while
    the stretch goes on, and again after a recovery and a new stretch."""
    rows = lambda rates: [
        {"step": i + 1, "answer_rate": a, "turns": 3.9, "searches": 3.0}
        for i, a in enumerate(rates)
    ]
    said = lambda rates: runtime.stops_answering(rows(rates))
    assert said([0.9] + [0.44] * 9) is None  # 9 steps
    line = said([0.9] + [0.44] * 10)
    assert line.startswith("step 11: the policy is learning to stop answering: training answer ")
    assert "rate 0.44, under half of step 1's 0.90 for 10 steps" in line
    assert "--folr-eligible any, --answer-stage outcome;" in line
    assert said([0.9] + [0.44] * 11) is None  # said once
    assert said([0.9] + [0.45] * 10) is None  # half exactly: not under it
    assert said([0.9] + [0.4] * 10 + [0.8] + [0.3] * 9) is None
    assert said([0.9] + [0.4] * 10 + [0.8] + [0.3] * 10) is not None  # a new stretch
    assert said([0.0] * 12) is None  # a policy that never answered does not stop


def test_step_metrics_over_updates_by_hand():
    """A step's update metrics: a ``*_max`` the max over its updates, every other the mean;
    skipped (non-finite) updates counted in a row across steps, as --max-bad-steps says."""
    updates = [
        {"loss": 1.0, "ratio_max": 1.5, "skipped": 0.0},
        {"loss": 3.0, "ratio_max": 1.2, "skipped": 1.0},
        {"loss": 5.0, "ratio_max": 1.4, "skipped": 1.0},
    ]
    assert learner.over_updates(updates) == pytest.approx(
        {"loss": 3.0, "ratio_max": 1.5, "skipped": 2 / 3}
    )
    assert learner.skipped_in_a_row(0, updates) == 2
    assert learner.skipped_in_a_row(4, updates) == 2  # its first update was fine: counted anew
    assert learner.skipped_in_a_row(4, updates[1:]) == 6  # 4 at the end of the step before
    assert learner.skipped_in_a_row(2, updates[:1]) == 0


def _group(tag, *trajectories):
    """A group of hand-made trajectories (outcome, first hit), two turns each, named ``tag``."""
    turn = rollout.Turn(
        [], [7, 8], [-0.5, -0.5], "x", protocol.Action("answer", "a", ""), (), None, []
    )
    return [
        rollout.Trajectory(tag, ("a",), "q", [5], [turn, turn], "a", o, o, o, h, "answer")
        for o, h in trajectories
    ]


def test_dynamic_sampling_by_hand(monkeypatch):
    """Two prompts a draw, two samples each, one process. Draw 0: an all-wrong group in which
    one trajectory hit the answer (A), an all-correct group (B); draw 1: a mixed group (C), an
    all-wrong group without a hit (D); draw 2: two mixed groups (E, F). TSPO keeps A (its
    returns after FOLR are 0.5 and 0) and C, from 2 draws; GRPO finds no signal in A, keeps C,
    E, takes 3 draws; with --max-draws 2 it is one group short and fills in A (tied)."""
    draws = [
        _group("A", (0, 1), (0, -1)) + _group("B", (1, 0), (1, 0)),
        _group("C", (1, -1), (0, -1)) + _group("D", (0, -1), (0, -1)),
        _group("E", (1, 0), (0, 1)) + _group("F", (0, 0), (1, -1)),
    ]
    timing = rollout.Timing(1.0, 0.5, 10, 4, 8)
    monkeypatch.setattr(train, "rollouts", lambda run, policy, step, draw=0: (draws[draw], timing))

    def run(algo, max_draws=10):
        cfg = Config(
            algo=algo, group_size=2, prompts_per_step=2, mini_batch=2, max_draws=max_draws,
            dynamic_sampling=True,
        )  # fmt: skip
        trajs, spent, counts = train.dynamic_sampling(
            SimpleNamespace(cfg=cfg), None, 0, draws[0], timing
        )
        return [t.question for t in trajs][::2], spent, counts

    groups, spent, counts = run("tspo")
    assert groups == ["A", "C"]
    assert counts == {"rollouts": 8, "groups_drawn": 4, "groups_short": 0}
    assert spent == rollout.Timing(2.0, 1.0, 20, 8, 16)  # both draws' time
    groups, _, counts = run("grpo")
    assert groups == ["C", "E"]
    assert counts == {"rollouts": 12, "groups_drawn": 6, "groups_short": 0}
    groups, _, counts = run("grpo", max_draws=2)
    assert groups == ["C", "A"]  # short of signal: a tied group fills the step
    assert counts == {"rollouts": 8, "groups_drawn": 4, "groups_short": 1}


def test_bad_input_gets_a_clear_message(small_world, small_policy, questions, tmp_path, capsys):
    """Bad inputs stop train.py's command line with one line naming the input, before work."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    cases = [
        (["--model", str(tmp_path / "no_model")], "no_model"),
        (["--data", str(empty)], "empty.jsonl"),
        (["--prompts-per-step", "4", "--mini-batch", "4"], "divide evenly over the 8 devices"),
        (["--mesh-fsdp", "3"], "--mesh-fsdp 3 must divide the 8 device(s) evenly"),
        (["--latent-reward", "1.5"], "latent_reward must lie in [0, 1), got 1.5"),
        (["--mini-batch", "0"], "--mini-batch must be >= 1, got 0"),
        (["--world", "hard"], "--world and --warm-start-seed pick the toy world: leave out"),
        (["--warm-start-seed", "-1"], "--warm-start-seed must be >= 0, got -1"),
    ]
    for extra, needle in cases:
        with pytest.raises(SystemExit) as exit_info:
            cli.run(train.main, args(small_world, small_policy, questions, tmp_path / "o", *extra))
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "error:" in err and needle in err and "Traceback" not in err, err


def test_rollout_cli_on_an_export_reproduces_train_evaluation(
    small_world, small_policy, questions, tmp_path, capsys
):
    """A run with its own rollout settings (a template file, 2 turns, small budgets), resumed
    for a second step: python rollout.py on its export, given only --model, --data, --corpus
    and --limit, reports train.py's evaluation of that step exactly. Along the way: the
    resumed run's report starts from step 0, zero warm-up trains at full lr from the first
    update, samples.jsonl and the trajectories hold the prompt (the template file's trailing
    newline kept), the export carries its settings and a generation config."""
    template = tmp_path / "template.txt"  # the template the test policy was warm-started on
    template.write_text(protocol.DEFAULT_TEMPLATE)
    assert protocol.DEFAULT_TEMPLATE.endswith("Question: {question}\n")
    out = tmp_path / "run"
    common = [
        *args(small_world, small_policy, questions, out),
        *("--eval-data", str(small_world.heldout), "--eval-size", "6", "--eval-batch", "4"),
        *("--eval-every", "1", "--template-file", str(template), "--log-samples", "1"),
        *("--warmup-steps", "0", "--lr", "1e-3"),
    ]
    first = train.main([*common, "--steps", "1"])["history"]
    assert first[1]["lr"] == 1e-3  # step 1's update ran at the peak lr
    assert 0 <= first[1]["logp_gap_mean"] <= first[1]["logp_gap_max"] < 1e-3  # float32 both
    capsys.readouterr()
    history = train.main([*common, "--steps", "2", "--resume"])["history"]
    report = capsys.readouterr().out
    assert [r["step"] for r in history] == [2]
    step0 = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert step0["step"] == 0
    assert "held-out, greedy    step    0  step    2" in report
    em_row = next(line.split() for line in report.splitlines() if line.startswith("  em "))
    assert em_row == ["em", f"{step0['eval_em']:.3f}", f"{history[-1]['eval_em']:.3f}"]

    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and all(r["prompt"] == protocol.build_prompt(r["question"]) for r in samples)
    export = out / "hf" / "step_2"
    settings = json.loads((export / "tspo_rollout.json").read_text())
    assert settings["template"] == protocol.DEFAULT_TEMPLATE and settings["greedy"] is True
    assert (settings["max_turns"], settings["max_obs_tokens"], settings["batch_size"]) == (2, 80, 4)
    assert json.loads((export / "generation_config.json").read_text())["eos_token_id"] == 0
    assert {str(a.dtype) for a in _weights(export).values()} == {"float32"}  # the source's

    trajectories = tmp_path / "trajectories.jsonl"
    summary = rollout_cli.main(
        [
            *("--model", str(export), "--data", str(small_world.heldout)),
            *("--corpus", str(small_world.corpus), "--limit", "6", "--out", str(trajectories)),
        ]
    )
    expected = {k.removeprefix("eval_"): v for k, v in history[-1].items() if k.startswith("eval_")}
    assert summary == expected and summary["response_tokens"] > 0
    rows = [json.loads(line) for line in trajectories.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [
        protocol.build_prompt(e.question) for e in data.load_examples(small_world.heldout)[:6]
    ]
