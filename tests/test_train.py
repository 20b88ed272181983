"""train.py end to end: mesh shapes, GRPO advantages, resume after SIGKILL, two processes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import rollout
import train
from tspo_jax import cli, data, protocol

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


def args(small_world, small_policy, questions, out, *extra):
    return [
        *("--model", str(small_policy), "--data", str(questions)),
        *("--corpus", str(small_world.corpus), "--out-dir", str(out)),
        *("--prompts-per-step", "8", "--mini-batch", "8", "--group-size", "4"),
        *("--max-turns", "2", "--max-new-tokens", "12", "--max-obs-tokens", "80"),
        *("--max-context", "384", "--outcome", "f1", "--kl-coef", "0.01"),
        *("--eval-every", "0", "--plot", "false", "--seed", "3"),
        *extra,
    ]


def test_mesh_shapes_give_the_same_losses(small_world, small_policy, questions, tmp_path):
    """(8, 1), (4, 2) and (1, 8) on 8 fake devices: same rollouts, losses and gradient norms.

    The learning rate is tiny so that step 2 samples from (numerically) the same policy on
    every mesh: AdamW moves a parameter by about lr whatever the size of its gradient."""
    runs = {}
    for data_axis, fsdp_axis in ((8, 1), (4, 2), (1, 8)):
        out = tmp_path / f"mesh_{data_axis}x{fsdp_axis}"
        mesh = ("--mesh-data", str(data_axis), "--mesh-fsdp", str(fsdp_axis))
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
    """With --algo grpo the logged advantages are the group-normalized outcomes, every turn."""
    out = tmp_path / "grpo"
    grpo = ("--algo", "grpo", "--log-samples", "1", "--steps", "1")
    train.main(args(small_world, small_policy, questions, out, *grpo))
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 8 * 4
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


def _run(argv, env=None, **kwargs):
    env = {**os.environ, "XLA_FLAGS": "", **(env or {})}
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


def test_resume_after_sigkill_is_exact(small_world, small_policy, questions, tmp_path):
    """4 steps straight == 2 steps, SIGKILL during the third, --resume for the last 2."""
    common = ("--steps", "4", "--checkpoint-every", "2", "--lr", "1e-3")
    straight = _run(args(small_world, small_policy, questions, tmp_path / "a", *common))
    assert straight.wait(timeout=600) == 0, straight.stdout.read()

    killed = _run(args(small_world, small_policy, questions, tmp_path / "b", *common))
    ckpt = tmp_path / "b" / "checkpoints" / "2"
    deadline = time.time() + 600
    while not ckpt.is_dir() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert ckpt.is_dir(), killed.stdout.read() if killed.poll() is not None else "timeout"
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "b" / "hf" / "step_4").exists()  # it did not finish
    # A checkpoint of a different config is refused with a clear message.
    bad = _run(
        args(
            small_world,
            small_policy,
            questions,
            tmp_path / "b",
            *common,
            "--resume",
            "--clip-high",
            "0.3",
        )
    )
    assert bad.wait(timeout=300) != 0
    assert "made with another config" in bad.stdout.read()

    resumed = _run(args(small_world, small_policy, questions, tmp_path / "b", *common, "--resume"))
    assert resumed.wait(timeout=600) == 0, resumed.stdout.read()
    a, b = _weights(tmp_path / "a" / "hf" / "step_4"), _weights(tmp_path / "b" / "hf" / "step_4")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    # The run did learn something: the weights moved from the warm start.
    start = _weights(small_policy)
    assert any(not np.array_equal(a[n], start[n]) for n in start)


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
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
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
            env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
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
        for key in ("reward", "response_tokens", "loss", "pg_loss", "grad_norm", "ref_kl"):
            np.testing.assert_allclose(b[key], a[key], rtol=2e-5, atol=1e-8, err_msg=key)
    a, b = (
        _weights(tmp_path / "one" / "hf" / "step_2"),
        _weights(tmp_path / "two" / "hf" / "step_2"),
    )
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_bad_input_gets_a_clear_message(small_world, small_policy, questions, tmp_path, capsys):
    """Bad inputs stop train.py's command line with one line naming the input, before work."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    cases = [
        (["--model", str(tmp_path / "no_model")], "no_model"),
        (["--data", str(empty)], "empty.jsonl"),
        (["--prompts-per-step", "4", "--mini-batch", "4"], "divide evenly over the 8 devices"),
        (["--mesh-fsdp", "3"], "--mesh-fsdp 3 must divide the 8 device(s) evenly"),
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
    summary = rollout.main(
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
