"""Optuna search across processes through a real PostgreSQL server: two workers on one study
merge their trials; a worker killed mid-study is resumed by a rerun.

Starts Debian's PostgreSQL (initdb + pg_ctl, in a temp folder, unix socket only) when it is
installed and psycopg is importable; skips otherwise. `.ci/run` installs the server.
"""
import glob
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

pytestmark = pytest.mark.slow
# SQLAlchemy 2.1 maps postgresql:// to psycopg (3); the dev extra installs psycopg[binary]
psycopg = pytest.importorskip("psycopg")


def _pg_bin() -> str | None:
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.path.exists(os.path.join(d, "initdb")):
            return d
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb else None


@pytest.fixture(scope="module")
def pg_url():
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not installed (apt-get install postgresql)")
    prefix = []
    root = tempfile.mkdtemp(prefix="dfplan-pg-")
    if os.geteuid() == 0:                        # postgres refuses to run as root
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server")
        os.chown(root, pw.pw_uid, pw.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    data, sock = os.path.join(root, "data"), root
    run = lambda *a: subprocess.run([*prefix, *a], check=True, capture_output=True, text=True)  # noqa: E731
    try:
        run(f"{bindir}/initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8")
        run(f"{bindir}/pg_ctl", "-D", data, "-w", "-t", "60", "-l", os.path.join(root, "log"), "start",
            "-o", f"-k {sock} -c listen_addresses='' -p 5439")
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"could not start PostgreSQL: {getattr(e, 'stderr', e)}")
    with psycopg.connect(dbname="postgres", user="postgres", host=sock, port=5439, autocommit=True) as conn:
        conn.execute("CREATE DATABASE optuna")
    try:
        yield f"postgresql://postgres@/optuna?host={sock}&port=5439"
    finally:
        subprocess.run([*prefix, f"{bindir}/pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    """A micro teacher and its sensitivity table (in-process: no server needed for these)."""
    from dfplan.cli import main
    from dfplan.config import Mamba2Config
    from dfplan.loading import save_mamba_ssm
    from dfplan.model import build_model
    from dfplan.tokenizer import train_bpe
    root = tmp_path_factory.mktemp("pg")
    cfg = Mamba2Config.preset("tiny").replace(d_model=32, n_layer=2, vocab_size=300, d_state=16, headdim=16,
                                              chunk_size=16, name="micro")
    rng = np.random.default_rng(7)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(["a cat", "the dog", "sees", "bits", "now"], 5))
                                for _ in range(1200)) + "\n")
    teacher = root / "teacher"
    save_mamba_ssm(build_model(cfg, seed=0), teacher, tokenizer=train_bpe([corpus.read_text()], 300))
    table = root / "sens" / "sensitivity.csv"
    assert main(["sensitivity", "--model", str(teacher), "--corpus", str(corpus), "--out", str(table),
                 "--windows", "4", "--seq-len", "32", "--candidates", "bin,bin+r8,int4,int8"]) == 0
    return {"root": root, "teacher": teacher, "table": table}


KILL_AFTER_TRIALS = r"""
import os, signal, sys, optuna
n = int(os.environ["KILL_AFTER"]); seen = [0]
real = optuna.study.Study.optimize
def optimize(self, *a, callbacks=None, **k):
    def hit(s, t):
        seen[0] += 1
        if seen[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
    return real(self, *a, callbacks=list(callbacks or []) + [hit], **k)
optuna.study.Study.optimize = optimize
from dfplan.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _worker(problem, url, out, trials, sampler="tpe", kill_after=None):
    args = ["search", "--model", str(problem["teacher"]), "--sensitivity", str(problem["table"]),
            "--budget", "30kB", "--out", str(out), "--solver", sampler, "--trials", str(trials),
            "--front-points", "2", "--storage", url]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if kill_after:
        env["KILL_AFTER"] = str(kill_after)
        return subprocess.Popen([sys.executable, "-c", KILL_AFTER_TRIALS, *args], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.Popen([sys.executable, "-m", "dfplan", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _study(url, sampler):
    import optuna
    from optuna.trial import TrialState
    sums = [s for s in optuna.get_all_study_summaries(url) if sampler in s.study_name]
    assert len(sums) == 1, [s.study_name for s in sums]
    study = optuna.load_study(study_name=sums[0].study_name, storage=url)
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), study.get_trials(deepcopy=False)


def _plan(out):
    return json.loads((out / "plan.json").read_text())["specs"]


def test_two_workers_merge_then_resume_after_a_kill(problem, pg_url, tmp_path):
    # two workers, one study: the study reaches N complete trials together, not 2N
    n = 24
    a, b = _worker(problem, pg_url, tmp_path / "a", n), _worker(problem, pg_url, tmp_path / "b", n)
    for p in (a, b):
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    complete, _ = _study(pg_url, "tpe")
    assert n <= len(complete) < 2 * n - 2, len(complete)
    assert _plan(tmp_path / "a") == _plan(tmp_path / "b")

    # another study (NSGA-II): one worker is SIGKILLed after a few trials while the other runs
    killed = _worker(problem, pg_url, tmp_path / "c", n, sampler="nsga2", kill_after=4)
    other = _worker(problem, pg_url, tmp_path / "d", n, sampler="nsga2")
    killed.communicate(timeout=600)
    assert killed.returncode == -9
    out, err = other.communicate(timeout=600)
    assert other.returncode == 0, err[-3000:]
    t0 = time.perf_counter()
    rerun = _worker(problem, pg_url, tmp_path / "c", n + 6, sampler="nsga2")
    out, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err[-3000:]
    complete, everything = _study(pg_url, "nsga2")
    assert len(complete) >= n + 6
    assert _plan(tmp_path / "c") == _plan(tmp_path / "d")       # both hold the same chosen plan
    assert time.perf_counter() - t0 < 300
