"""A kill at any moment is survivable: SIGKILL training at random moments (in the first
milliseconds, in the first second, while a file is being written, anywhere), resume each time, and
the finished run equals an uninterrupted one: every metric but wall time and every checkpoint,
bitwise.

Training runs in children of `forkserver.Server`, so two dozen kills cost seconds, not two dozen
interpreter start-ups."""

from __future__ import annotations

import random

import pytest
from forkserver import Server, assert_same_run

from mechlrmc.runs import LOCK_FILE, CheckpointError, Run, RunLock

STEPS = 200
KILLS_PER_RUN = 7
TRAIN = ["train", "--preset", "tiny", "--steps", str(STEPS), "--quiet", "--set", "train.threads=1",
         "--set", "train.checkpoint_every=25", "--set", "train.eval_every=10"]


def last_checkpoint(out) -> int:
    """The step a resume of `out` starts from (0 before its first checkpoint)."""
    try:
        return Run(out).steps[-1]
    except (CheckpointError, IndexError):
        return 0


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(tmp_path):
    server = Server(tmp_path / "logs")
    try:
        reference = tmp_path / "reference"
        first = server.run(TRAIN, reference)
        assert first["status"] == 0 and not first["killed"]
        length = first["seconds"]
        rng = random.Random(9)
        kills = []
        for run_index in range(3):
            out = tmp_path / f"killed{run_index}"
            # first milliseconds (directory creation), first second, while writing, right after the
            # step-0 resume state (no Adam state yet), then anywhere in what is left of the run
            plan = [("after", rng.uniform(0.0, 0.03)), ("after", rng.uniform(0.0, 1.0)), ("on_write", None),
                    ("after", rng.uniform(0.0, 0.2)), ("on_write", None), ("on_write", None)]
            if run_index == 2:
                plan[0] = ("on_file", None)  # a fresh run's first resume state is the step-0 one
            landed = 0
            for attempt in range(2 * KILLS_PER_RUN):
                if landed == KILLS_PER_RUN:
                    break
                if attempt < len(plan):
                    kind, after = plan[attempt]
                else:
                    kind, after = "after", rng.uniform(0.0, 0.8 * length * (1 - last_checkpoint(out) / STEPS))
                argv = TRAIN if attempt == 0 else [*TRAIN, "--resume"]
                result = server.run(argv, out, after=after, on_write=kind == "on_write",
                                    on_file="resume.safetensors" if kind == "on_file" else None)
                kills.append((run_index, kind, after, result))
                landed += result["killed"]
                if not result["killed"]:
                    assert result["status"] == 0, result
            final = server.run([*TRAIN, "--resume"], out)
            assert final["status"] == 0 and not final["killed"], final
            assert_same_run(Run(reference), Run(out))
            assert not list(out.glob(".*.tmp*")) and not list(out.glob("checkpoints/.*.tmp*"))
            with RunLock(out):  # no stale lock after all those killed holders
                assert (out / LOCK_FILE).is_file()
    finally:
        server.close()
    killed = [k for k in kills if k[3]["killed"]]
    print("\n".join(f"run {r} {kind} {after} -> {res}" for r, kind, after, res in kills))
    assert len(killed) >= 20, f"only {len(killed)} kills landed"
    assert sum(k[3]["during_write"] for k in killed) >= 6, "no kill landed while a file was being written"
    assert sum((k[2] or 1) < 1.0 for k in killed) >= 6
    logs = "".join(res["stderr"] for *_, res in kills)
    assert "Traceback" not in logs and "warning" not in logs
