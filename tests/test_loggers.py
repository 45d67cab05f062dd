"""logger=csv, logger=wandb (offline), logger=mlflow (a local SQLite store) with the real libraries: every logger
config composes; PPO's per-iteration ``ppo/*`` metrics reach each logger through Lightning (one value per
iteration); stage=pipeline sends its report's per-iteration scalars (``pipeline/*``, step = iteration) and its
final metrics to the configured loggers; a logger whose package is missing is a one-line error; wandb stays offline
(and off the network) without credentials."""
import csv
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

from llama2_lit.errors import UserError
from llama2_lit.stages import loggers, pipeline
from tests.conftest import ROOT
from tests.test_pipeline import fake_runner
from tests.test_ppo import parts, ppo_overrides  # noqa: F401  (parts: a pytest fixture)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: single-threaded tiny models

ITERATIONS = 2  # tests/test_ppo.py: ppo_overrides runs ppo.iterations=2


def csv_rows(run_dir: Path) -> list[dict[str, str]]:
    files = sorted((run_dir / "csv").glob("version_*/metrics.csv"))
    assert len(files) == 1, files
    with files[0].open(newline="") as f:
        return list(csv.DictReader(f))


def mlflow_run(cfg):
    """The one run in the config's MLflow store, and its client."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(str(cfg.logger.mlflow.tracking_uri))
    experiment = client.get_experiment_by_name(str(cfg.logger.mlflow.experiment_name))
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, runs
    return client, runs[0]


def history(client, run, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))


# ------------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name,target", [("csv", "CSVLogger"), ("wandb", "WandbLogger"), ("mlflow", "MLFlowLogger"),
                                         ("tensorboard", "TensorBoardLogger"), ("none", None)])
def test_every_logger_config_composes(make_cfg, tmp_path, name, target):
    cfg = make_cfg(f"logger={name}", small=False)
    nodes = OmegaConf.to_container(cfg.logger, resolve=True)
    if target is None:
        assert nodes == {}
        return
    (node,) = nodes.values()
    assert node["_target_"] == f"lightning.pytorch.loggers.{target}"
    if name == "mlflow":  # one local store under the output root, no server
        root = Path(cfg.paths.output_root)
        assert node["tracking_uri"] == f"sqlite:///{root}/mlruns/mlflow.db"
        assert node["artifact_location"] == f"{root}/mlruns/artifacts"
    else:  # files under the run directory
        assert node["save_dir"] == str(tmp_path)
    if name == "wandb":
        assert node["offline"] == {"_target_": "llama2_lit.stages.loggers.wandb_offline"} and not node["log_model"]


# ---------------------------------------------------------------------------------------- stage=ppo, Trainer


def test_ppo_metrics_reach_the_csv_logger(make_cfg, parts, tmp_path):  # noqa: F811
    from llama2_lit.run import run

    run(make_cfg(*ppo_overrides(parts), "logger=csv", out=tmp_path))
    rows = csv_rows(tmp_path)
    ppo = [r for r in rows if r.get("ppo/kl")]
    assert [int(r["step"]) for r in ppo] == list(range(1, ITERATIONS + 1))  # one row per iteration, step: iteration
    for key in ("ppo/reward_raw", "ppo/kl", "ppo/policy_loss", "ppo/value_loss", "ppo/entropy", "ppo/iteration"):
        assert all(r[key] != "" for r in ppo), key
    assert [float(r["ppo/iteration"]) for r in ppo] == [1.0, 2.0]
    assert any(r.get("val/reward") for r in rows)  # the held-out evaluation too


def test_ppo_metrics_reach_mlflow(make_cfg, parts, tmp_path):  # noqa: F811
    from llama2_lit.run import run

    cfg = make_cfg(*ppo_overrides(parts), "logger=mlflow", f"paths.output_root={tmp_path / 'root'}",
                   out=tmp_path / "run")
    run(cfg)
    assert (tmp_path / "root" / "mlruns" / "mlflow.db").is_file()
    client, r = mlflow_run(cfg)
    assert r.info.status == "FINISHED" and r.info.run_name == "ppo" and r.data.tags["run_dir"] == str(tmp_path / "run")
    for key in ("ppo/kl", "ppo/reward_raw", "ppo/policy_loss", "ppo/value_loss", "ppo/entropy", "ppo/iteration"):
        assert [s for s, _ in history(client, r, key)] == list(range(1, ITERATIONS + 1)), key
    assert [v for _, v in history(client, r, "ppo/iteration")] == [1.0, 2.0]


def _wandb_records(path: Path):
    """The records of an offline run's ``run-<id>.wandb`` file (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's zero-filled tail
            pos += left
            continue
        n, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # FULL, LAST
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


LOOPBACK = ("localhost", "127.0.0.1", "::1")  # wandb talks to its own service process over a local socket
_NET: list | None = None  # while a list: the network calls this process makes (an audit hook cannot be removed)
_HOOKED: list = []


def _audit(event, args):
    if _NET is None:
        return
    if event == "socket.getaddrinfo" and args[0] not in LOOPBACK or (
            event == "socket.connect" and args[0].family != socket.AF_UNIX and args[1][0] not in LOOPBACK):
        _NET.append((event, args[:2] if event == "socket.getaddrinfo" else args[1]))


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """No W&B credentials (nor a netrc), wandb's folders in tmp_path, the server a host that cannot resolve (RFC 2606
    .invalid); yields the list of network calls the Python process makes meanwhile."""
    global _NET
    wandb = pytest.importorskip("wandb", reason="wandb is not installed (pip install wandb)")
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE"):  # WANDB_MODE: Lightning sets it
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_BASE_URL", "http://wandb.invalid")
    for var, sub in (("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / sub))
    monkeypatch.setenv("WANDB_SILENT", "true")
    if not _HOOKED:
        sys.addaudithook(_audit)
        _HOOKED.append(_audit)
    _NET = []
    try:
        yield _NET
    finally:
        _NET = None
        wandb.finish()
        wandb.teardown()


def test_ppo_metrics_reach_wandb_offline_without_the_network(make_cfg, parts, tmp_path, offline_wandb):  # noqa: F811
    import wandb

    from llama2_lit.run import run

    out = tmp_path / "run"
    run(make_cfg(*ppo_overrides(parts), "logger=wandb", out=out))
    wandb.finish()  # Lightning's finalize leaves the run open (it ends at exit)
    wandb.teardown()  # and wait for wandb-core, which writes the run file
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    for _ in range(150):  # the run file ends with its exit record (wandb-core may still be writing it)
        try:
            records = list(_wandb_records(next(run_dir.glob("run-*.wandb"))))
        except Exception:  # noqa: BLE001 - a record half written
            records = []
        if records and records[-1].WhichOneof("record_type") == "exit":
            break
        time.sleep(0.2)
    kinds = [r.WhichOneof("record_type") for r in records]
    assert kinds and kinds[-1] == "exit", kinds
    steps, summary = {}, {}
    for record, kind in zip(records, kinds):
        if kind == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            for k, v in row.items():
                if k.startswith("ppo/"):
                    steps.setdefault(k, []).append(row["trainer/global_step"])
                    summary[k] = v
        elif kind == "run":
            assert record.run.project == "llama2-lit" and record.run.display_name == "ppo"
    assert {"ppo/kl", "ppo/reward_raw", "ppo/policy_loss", "ppo/iteration"} <= set(steps), kinds
    assert steps["ppo/kl"] == steps["ppo/iteration"] == list(range(1, ITERATIONS + 1))
    assert summary["ppo/iteration"] == float(ITERATIONS)
    assert offline_wandb == []  # no DNS lookup nor connection outside the machine


WANDB_PIPELINE = """
import socket, sys
net = open(sys.argv[2], "w")
local = ("localhost", "127.0.0.1", "::1")
def audit(event, args):  # every DNS lookup or connection outside the machine, until the interpreter exits
    if event == "socket.getaddrinfo" and args[0] not in local or (
            event == "socket.connect" and args[0].family != socket.AF_UNIX and args[1][0] not in local):
        print(event, args[1] if event == "socket.connect" else args[:2], file=net, flush=True)
sys.addaudithook(audit)
from llama2_lit.config import compose
from llama2_lit.stages import loggers, pipeline
from tests.test_pipeline import fake_runner
tmp = sys.argv[1]
cfg = compose(["stage=pipeline", f"pipeline.root={tmp}/p", "pipeline.iterations=2", "logger=wandb",
               f"paths.output_dir={tmp}/run", f"paths.output_root={tmp}/root"])
pipeline.run(cfg, runner=fake_runner([]))
"""


def test_pipeline_metrics_reach_wandb_offline_and_nothing_reaches_the_network(tmp_path, offline_wandb):
    """A whole process (wandb flushes its telemetry at exit): the pipeline's metrics in the offline run, and not
    one DNS lookup or connection outside the machine from start to exit."""
    net = tmp_path / "net.txt"
    done = subprocess.run([sys.executable, "-c", WANDB_PIPELINE, str(tmp_path), str(net)], cwd=ROOT, timeout=300,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert net.read_text() == ""  # the process ended: wandb's exit hooks ran too
    (run_dir,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    gold, final = [], {}
    for record in _wandb_records(next(run_dir.glob("run-*.wandb"))):
        if record.WhichOneof("record_type") == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            if "pipeline/gold_helpfulness" in row:
                gold.append((row["trainer/global_step"], row["pipeline/gold_helpfulness"]))
            final.update({k: v for k, v in row.items() if k.startswith("pipeline/final_")})
    assert gold == [(0, 0.0), (1, pytest.approx(0.1)), (2, pytest.approx(0.2))]
    assert final == {"pipeline/final_gold_helpfulness": pytest.approx(0.2), "pipeline/final_gold_safety": 1.0}


def test_wandb_is_offline_without_credentials(tmp_path, monkeypatch):
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert loggers.wandb_offline()  # no netrc file
    (tmp_path / "netrc").write_text("machine github.com login me password x\n")
    assert loggers.wandb_offline()  # no entry for W&B
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password k" + "0" * 39 + "\n")
    assert not loggers.wandb_offline()  # `wandb login`'s entry
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert loggers.wandb_offline()  # another host: its own entry is needed
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert not loggers.wandb_offline()
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert not loggers.wandb_offline()  # the user's WANDB_MODE decides (wandb reads it; Lightning leaves it)


# ------------------------------------------------------------------------------------------- stage=pipeline


def _pipeline_cfg(make_cfg, tmp_path, logger):
    return make_cfg("stage=pipeline", f"pipeline.root={tmp_path / 'p'}", "pipeline.iterations=2",
                    f"paths.output_root={tmp_path / 'root'}", f"logger={logger}", out=tmp_path / "run")


def test_pipeline_metrics_reach_the_csv_logger(make_cfg, tmp_path):
    metrics = pipeline.run(_pipeline_cfg(make_cfg, tmp_path, "csv"), runner=fake_runner([]))
    rows = csv_rows(tmp_path / "run")
    gold = [(int(r["step"]), float(r["pipeline/gold_helpfulness"])) for r in rows if r.get("pipeline/gold_helpfulness")]
    assert gold == [(0, 0.0), (1, pytest.approx(0.1)), (2, pytest.approx(0.2))]  # fake_runner: 0.1 x iteration
    per_it = [r for r in rows if r.get("pipeline/rs_max")]
    assert [int(r["step"]) for r in per_it] == [1, 2] and all(float(r["pipeline/rs_max"]) == 0.7 for r in per_it)
    assert all(float(r["pipeline/rm_helpfulness_acc"]) == 0.6 for r in per_it)
    assert [int(r["step"]) for r in rows if r.get("pipeline/iteration_seconds")] == [0, 1, 2]
    (final,) = [r for r in rows if r.get("pipeline/final_gold_helpfulness")]
    assert int(final["step"]) == 2
    assert {k: float(final[k]) for k in metrics} == pytest.approx(metrics)


def test_pipeline_metrics_reach_mlflow(make_cfg, tmp_path):
    cfg = _pipeline_cfg(make_cfg, tmp_path, "mlflow")
    metrics = pipeline.run(cfg, runner=fake_runner([]))
    client, r = mlflow_run(cfg)
    assert r.info.status == "FINISHED" and r.info.run_name == "pipeline"
    assert history(client, r, "pipeline/gold_helpfulness") == [(0, 0.0), (1, pytest.approx(0.1)),
                                                               (2, pytest.approx(0.2))]
    assert history(client, r, "pipeline/rm_helpfulness_acc") == [(1, 0.6), (2, 0.6)]
    assert [s for s, _ in history(client, r, "pipeline/iteration_seconds")] == [0, 1, 2]
    for key, value in metrics.items():
        assert history(client, r, key) == [(2, pytest.approx(value))], key


def test_a_missing_logger_package_stops_the_pipeline_before_any_step(make_cfg, tmp_path):
    try:
        import comet_ml  # noqa: F401
        pytest.skip("comet_ml is installed: no missing package to report")
    except ImportError:
        pass
    cfg = _pipeline_cfg(make_cfg, tmp_path, "csv")
    with open_dict(cfg):
        cfg.logger.off = None  # null entries are skipped
        cfg.logger.comet = {"_target_": "lightning.pytorch.loggers.CometLogger"}
    calls = []
    with pytest.raises(UserError) as e:
        pipeline.run(cfg, runner=fake_runner(calls))
    assert str(e.value) == ("logger.comet (CometLogger) needs the 'comet_ml' package, which is not installed: "
                            "pip install comet-ml")
    assert calls == [] and not (tmp_path / "p").exists()
    # mlflow-skinny without SQLAlchemy (no SQLite store; a fresh process, as mlflow registers its stores on import)
    code = ("import sys; sys.modules['sqlalchemy'] = None\n"
            "from omegaconf import OmegaConf\nfrom llama2_lit.stages import loggers\n"
            "cfg = OmegaConf.create({'logger': {'mlflow': {'_target_': 'lightning.pytorch.loggers.MLFlowLogger', "
            f"'tracking_uri': 'sqlite:///{tmp_path}/mlruns/mlflow.db'}}}}}})\n"
            "try:\n    loggers.instantiate_loggers(cfg)\nexcept Exception as e:\n    print(type(e).__name__, e)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    assert done.stdout.strip().splitlines()[-1] == (
        "UserError logger.mlflow (MLFlowLogger) needs the 'sqlalchemy' package, which is not installed: "
        "pip install sqlalchemy alembic"), done.stdout + done.stderr
    # a target that does not exist is not a missing package: Hydra's own error
    with open_dict(cfg):
        cfg.logger = {"typo": {"_target_": "lightning.pytorch.loggers.NoSuchLogger"}}
    with pytest.raises(Exception, match="NoSuchLogger") as e:
        loggers.instantiate_loggers(cfg)
    assert not isinstance(e.value, UserError)
