"""Bad input ends with one line naming the file, line and field (or the valid choices), exit code != 0."""
import json
import os
import subprocess
import sys

import pytest
from hydra.utils import instantiate

from llama2_lit.errors import UserError
from llama2_lit.run import run
from tests.conftest import ROOT


def cli(*args):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "llama2_lit", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def assert_one_line_error(r, *needles):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    for n in needles:
        assert n in r.stderr, r.stderr[-2000:]


def test_cli_malformed_json_line_names_file_and_line(tmp_path, cache_dir):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n{oops\n")
    r = cli("data=alpaca", f"data.path={p}", f"paths.cache_dir={cache_dir}", f"hydra.run.dir={tmp_path}/run")
    assert r.returncode == 2
    assert_one_line_error(r, f"error: {p}:2: malformed JSON")


def test_cli_unknown_stage_lists_the_choices(tmp_path):
    r = cli("stage=nope", f"hydra.run.dir={tmp_path}/run")
    assert_one_line_error(r, "Could not find 'stage/nope'", "Available options in 'stage'", "sft", "pretrain")


def test_cli_unknown_model_and_data(tmp_path):
    assert_one_line_error(cli("model=nope", f"hydra.run.dir={tmp_path}/r1"), "Available options in 'model'", "tiny")


def test_cli_missing_model_path(tmp_path, cache_dir):
    r = cli("model.path=/does/not/exist", f"paths.cache_dir={cache_dir}", f"hydra.run.dir={tmp_path}/run")
    assert r.returncode == 2
    assert_one_line_error(r, "error: model.path: '/does/not/exist' does not exist")


@pytest.mark.parametrize("row,needle", [
    ({"instruction": "a"}, ":3: field 'output' is missing"),
    ({"instruction": "a", "output": ""}, ":3: field 'output' is empty"),
    ({"instruction": "", "output": "b"}, ":3: field 'instruction' is empty"),
])
def test_bad_records_name_the_line_and_field(make_cfg, tmp_path, row, needle):
    p = tmp_path / "d.jsonl"
    good = json.dumps({"instruction": "a", "output": "b"})
    p.write_text(f"{good}\n{good}\n{json.dumps(row)}\n")
    dm = instantiate(make_cfg("data=alpaca", f"data.path={p}", small=False).data)
    with pytest.raises(UserError, match=str(p) + needle):
        dm.setup("fit")


def test_zero_examples_after_filtering_is_an_error(make_cfg, tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"instruction": "x " * 200, "output": "y"}) for _ in range(4)) + "\n")
    cfg = make_cfg("data=alpaca", f"data.path={p}", "stage.seq_len=32", "data.overlong=drop", small=False)
    with pytest.raises(UserError, match=r"no train examples left after filtering \(3 read, 3 dropped"):
        instantiate(cfg.data).setup("fit")


def test_unknown_packing_and_format_are_named(make_cfg, tmp_path):
    with pytest.raises(Exception, match=r"data.packing: unknown 'zip' \(choose \['isolated', 'concat', 'none'\]\)"):
        instantiate(make_cfg("data.packing=zip", small=False).data)
    with pytest.raises(Exception, match="data.format: unknown 'csv'"):
        instantiate(make_cfg("data=alpaca", "data.path=x.jsonl", "data.format=csv", small=False).data)
