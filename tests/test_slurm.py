"""The project's own sbatch script on a real single-node SLURM cluster (localhost, CPU DDP).

The module fixture installs Debian's slurmctld/slurmd/slurm-client/munge when they are missing
(root only), starts diffurec_lightning/launch/local_slurm.sh on free ports under a temporary
folder, and stops every daemon by its pidfile afterwards. Jobs run 2 DDP ranks (`srun`, gloo) of a
tiny DiffuRecSys on the real toys data for a few steps.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from diffurec_lightning.config import compose_config
from diffurec_lightning.errors import ConfigError
from diffurec_lightning.launch.slurm import (
    RUN_DIR,
    WANDB_ID,
    SlurmJob,
    render,
    submit,
    time_limit_seconds,
    train_overrides,
    write_script,
)

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SCRIPT = REPO / "diffurec_lightning" / "launch" / "local_slurm.sh"
PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
STEPS_PER_EPOCH = 3
TINY = [
    "model.hidden_size=16",
    "model.net.num_blocks=1",
    "model.net.num_heads=1",
    "model.diffusion.num_steps=2",
    "trainer.check_val_every_n_epoch=1",
    f"++trainer.limit_train_batches={STEPS_PER_EPOCH}",
    "++trainer.limit_val_batches=1",
    "++trainer.limit_test_batches=1",
    "callbacks.early_stopping=null",  # the step count must not depend on a tiny model's luck
    "callbacks.progress_bar=null",
]


def install_reason() -> str | None:
    """Why SLURM cannot run here (after trying to install it), or None when it can."""
    if os.geteuid() != 0:
        return "not root: the local SLURM cluster runs munged and slurmd as root"
    tools = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "sinfo")
    if all(shutil.which(tool) for tool in tools):
        return None
    if shutil.which("apt-get") is None:
        return "SLURM is not installed and there is no apt-get to install it"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    for attempt in ([install], [["apt-get", "update", "-q"], install]):
        done = None
        for command in attempt:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
            if done.returncode != 0:
                break
        if done is not None and done.returncode == 0:
            return None
    last = (done.stderr.strip().splitlines() or ["?"])[-1] if done else "?"
    return f"could not install {' '.join(PACKAGES)} with apt-get: {last}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, str]]:
    reason = install_reason()
    if reason:
        print(f"test_slurm skipped: {reason}", file=sys.stderr)
        pytest.skip(reason)
    # Not under pytest's basetemp: munged needs every folder above its socket to be o+x.
    root = Path(tempfile.mkdtemp(prefix="diffurec-slurm-"))
    env = dict(
        os.environ,
        SLURM_CONF=str(root / "slurm.conf"),
        SLURMCTLD_PORT=str(free_port()),
        SLURMD_PORT=str(free_port()),
    )
    try:
        started = subprocess.run(
            [str(CLUSTER_SCRIPT), "start", str(root)], env=env, capture_output=True, text=True
        )
        assert started.returncode == 0, started.stderr
        yield {"SLURM_CONF": env["SLURM_CONF"]}
    finally:
        # Jobs first (their slurmstepd would outlive slurmd), then the daemons by pidfile.
        subprocess.run(["scancel", "--user=root"], env=env, capture_output=True)
        deadline = time.time() + 60
        while time.time() < deadline and squeue(env):
            time.sleep(0.5)
        subprocess.run([str(CLUSTER_SCRIPT), "stop", str(root)], env=env, check=True)
        shutil.rmtree(root, ignore_errors=True)


def squeue(env: dict[str, str]) -> str:
    done = subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True)
    return done.stdout.strip()


def job_info(job_id: str) -> dict[str, str]:
    done = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True
    )
    return dict(re.findall(r"(\w+)=(\S*)", done.stdout))


def wait_for(predicate, timeout: float, what: str, log: Path) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; {diagnosis(log)}")


def diagnosis(log: Path) -> str:
    """The job log's tail and the daemons' lines, for a failure message."""
    parts = [f"job log tail:\n{log.read_text()[-3000:] if log.is_file() else '(no log)'}"]
    for name in DAEMON_LOGS:
        parts.append(f"{name} tail:\n{daemon_log(name)[-2000:] or '(missing)'}")
    return "\n".join(parts)


DAEMON_LOGS = ("slurmctld.log", "slurmd.log")


def daemon_log(name: str) -> str:
    """A log of the test cluster's daemons (local_slurm.sh keeps them beside slurm.conf)."""
    path = Path(os.environ["SLURM_CONF"]).parent / "log" / name
    return path.read_text(errors="replace") if path.is_file() else ""


def credential_refused() -> bool:
    """Whether slurmd refused to launch an attempt whose credential it had revoked."""
    return any("credential revoked" in daemon_log(name).lower() for name in DAEMON_LOGS)


def rank_pid(job_id: str, rank: int) -> int:
    """PID of the training process of global rank ``rank`` (not of its children)."""
    done = subprocess.run(
        ["scontrol", "listpids", job_id], capture_output=True, text=True, check=True
    )
    # Columns: PID JOBID STEPID LOCALID GLOBALID; the batch step runs the shell script.
    rows = [line.split() for line in done.stdout.splitlines()[1:]]
    pids = {int(row[0]) for row in rows if len(row) == 5 and row[4] == str(rank)}
    roots = [pid for pid in pids if parent_pid(pid) not in pids and is_training(pid)]
    assert len(roots) == 1, f"rank {rank} of job {job_id}: {done.stdout}"
    return roots[0]


def parent_pid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])  # the command name may contain spaces


def is_training(pid: int) -> bool:
    return b"diffurec_lightning.train" in Path(f"/proc/{pid}/cmdline").read_bytes()


def node_idle() -> bool:
    done = subprocess.run(["scontrol", "show", "node", "-o"], capture_output=True, text=True)
    states = re.findall(r"State=(\S+)", done.stdout)
    return bool(states) and all(state.startswith("IDLE") for state in states)


def finished(job_id: str) -> bool:
    return job_info(job_id)["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")


@pytest.fixture()
def slurm_env(cluster: dict[str, str], run_env: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Client environment of the cluster; jobs inherit it (outputs under run_env, toys mirror)."""
    monkeypatch.setenv("SLURM_CONF", cluster["SLURM_CONF"])
    # Lightning derives the DDP port from the job id, which restarts at 1 on every test cluster.
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    # A process that ran wandb (earlier tests here, a user's notebook) keeps a service token in its
    # environment, and sbatch exports it to the job. A dead one makes any wandb.init in the job
    # fail unless the script drops it; a live one made requeued attempts collide on the run id.
    monkeypatch.setenv("WANDB_SERVICE", f"3-{os.getpid()}-unix-{run_env}/no-such-wandb-socket")
    monkeypatch.setenv("WANDB_DIR", str(run_env))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(run_env / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(run_env / "wandb-cache"))
    return run_env


def submit_tiny(home: Path, name: str, epochs: int) -> tuple[str, Path, Path]:
    """Submit 2 CPU DDP tasks of a tiny toys run; return (job id, run folder, log)."""
    extra = [f"trainer.max_epochs={epochs}"]
    if "representation" in compose_config().callbacks:
        extra.append("callbacks.representation=null")  # a t-SNE picture is no part of this
    job = SlurmJob(
        data="toys",
        gpus_per_node=0,
        tasks_per_node=2,
        cpus_per_task=1,
        time="00:10:00",
        job_name=name,
        workdir=REPO,
        overrides=(*TINY, *extra),
    )
    job_id = submit(write_script(job))
    run_dir = home / "outputs" / "slurm" / f"{job_id}_toys_diffurecsys"
    return job_id, run_dir, job.log_dir / f"{name}-{job_id}.out"


@pytest.mark.slow  # make test-all: a real run, long on 2 cores
def test_sbatch_script_trains_two_ddp_ranks(slurm_env: Path) -> None:
    job_id, run_dir, log = submit_tiny(slurm_env, "diffurec-test-ddp", epochs=2)
    wait_for(lambda: finished(job_id), 300, f"job {job_id} to finish", log)
    info, text = job_info(job_id), log.read_text()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), diagnosis(log)
    assert "MEMBER: 2/2" in text  # two ranks, started by srun, joined one process group

    results = json.loads((run_dir / "results.json").read_text())
    assert results["global_step"] == 2 * STEPS_PER_EPOCH and results["epochs"] == 2
    assert results["resumed_from"] is None
    assert {"test/hr@10", "test/ndcg@10"} <= set(results["test"])
    assert Path(results["best_checkpoint"]).is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


def test_requeue_signal_resumes_from_the_checkpoint(slurm_env: Path) -> None:
    epochs = 12
    job_id, run_dir, log = submit_tiny(slurm_env, "diffurec-test-requeue", epochs=epochs)
    last = run_dir / "checkpoints" / "last.ckpt"
    wait_for(lambda: last.is_file() or finished(job_id), 300, "the first checkpoint", log)
    assert not finished(job_id), "the job ended before it could be signalled"

    # What SLURM sends --signal-lead seconds before the time limit, sent now, and only to rank 1:
    # the ranks must agree to stop at one step (with Lightning's own handler, the signalled rank
    # checkpoints alone and waits in a barrier while the other waits in the gradient all-reduce:
    # the job hangs, as it did on CI), and rank 0, which saw no signal, must requeue.
    os.kill(rank_pid(job_id, rank=1), signal.SIGUSR1)
    wait_for(lambda: job_info(job_id).get("Restarts") == "1", 120, "the requeue", log)
    start_requeued(job_id, log)
    restarts = 1
    if job_info(job_id)["JobState"] == "FAILED" and credential_refused():
        # slurmd revokes a job's credential when it kills an attempt, and refuses a new attempt
        # whose credential is not strictly newer (1 s resolution) than that revocation; under
        # load it may stamp the revocation late. Then our script never ran ("start 1" is
        # missing): SLURM's own race, not our requeue. Requeue once more, as an operator would.
        assert f"start {restarts} on" not in log.read_text(), diagnosis(log)
        subprocess.run(["scontrol", "requeue", job_id], check=True)
        restarts = 2
        wait_for(lambda: job_info(job_id).get("Restarts") == "2", 60, "the second requeue", log)
        start_requeued(job_id, log)

    info, text = job_info(job_id), log.read_text()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), diagnosis(log)
    assert "start 0 on" in text and f"start {restarts} on" in text  # the same script ran twice
    results = json.loads((run_dir / "results.json").read_text())
    assert Path(results["resumed_from"]).name == "hpc_ckpt_1.ckpt"
    assert results["global_step"] == epochs * STEPS_PER_EPOCH  # continuous: no step lost or redone
    assert results["epochs"] == epochs
    # Both attempts logged to one W&B run id (offline: one folder per attempt).
    runs = sorted(path.name for path in (run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    assert all(name.endswith(f"-slurm-localtest-{job_id}") for name in runs), runs


def start_requeued(job_id: str, log: Path) -> None:
    """Start a requeued (PENDING) job now and wait until it ends."""
    # A requeued job waits ~2 minutes (BeginTime) before it may start again; skip the wait.
    wait_for(lambda: job_info(job_id)["JobState"] == "PENDING", 60, "PENDING", log)
    # Only once slurmd has finished killing the last attempt, and in a later second than that:
    # a launch credential not newer than the attempt's revocation is refused ("Job credential
    # revoked" in slurmd's log) and the job fails with exit code 1 before our script runs.
    wait_for(node_idle, 60, "the node to be idle", log)
    time.sleep(1.5)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
    wait_for(lambda: finished(job_id), 300, f"job {job_id} to finish after requeue", log)


# -- the generator alone (no cluster) -----------------------------------------------------------


def test_multi_node_gpu_script() -> None:
    job = SlurmJob(data="beauty", gpus_per_node=4, nodes=2, partition="gpu", mem="64G")
    script = render(job)
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gres=gpu:4",
        "#SBATCH --partition=gpu",
        "#SBATCH --mem=64G",
        "#SBATCH --signal=SIGUSR1@90",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
    ):
        assert line in script.splitlines()
    (launch,) = [line for line in script.splitlines() if line.startswith("srun ")]
    argv = shlex.split(launch)
    assert argv[argv.index("-m") + 1] == "diffurec_lightning.train"
    for override in (
        "data=beauty",
        "trainer=gpu",
        "trainer.devices=4",
        "trainer.num_nodes=2",
        "trainer.strategy=ddp",
        "ckpt_path=auto",
        f"hydra.run.dir={RUN_DIR}",
        f"logger.wandb.id={WANDB_ID}",
    ):
        assert override in argv
    # Every override composes; interpolations stay for the job to resolve, and so does
    # precision: auto, on the GPU node (bf16-mixed where the GPU has bf16).
    cfg = compose_config(argv[argv.index("-m") + 2 :])
    assert (cfg.trainer.devices, cfg.trainer.num_nodes, cfg.trainer.precision) == (4, 2, "auto")


def test_single_cpu_task_and_csv_logger() -> None:
    argv = train_overrides(SlurmJob(gpus_per_node=0, overrides=("logger=csv",)))
    assert "trainer=cpu" in argv and "trainer.strategy=auto" in argv
    assert not any(item.startswith("logger.wandb.id=") for item in argv)


@pytest.mark.parametrize(
    ("job", "message"),
    [
        (SlurmJob(time="00:04:00"), "leaves under 180 s"),
        (SlurmJob(time="1h"), "use HH:MM:SS"),
        (SlurmJob(tasks_per_node=2), "one task per GPU"),
        (SlurmJob(nodes=0), "--nodes >= 1"),
        (SlurmJob(overrides=("trainer.max_epochz=3",)), "max_epochz"),
        (SlurmJob(data="nosuchdata"), "nosuchdata"),
    ],
)
def test_bad_jobs_fail_before_submission(job: SlurmJob, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        render(job)


def test_time_limits_in_slurm_formats() -> None:
    assert time_limit_seconds("30") == 1800
    assert time_limit_seconds("5:30") == 330
    assert time_limit_seconds("12:00:00") == 43_200
    assert time_limit_seconds("1-12") == 129_600
    assert time_limit_seconds("2-00:30:00") == 174_600
