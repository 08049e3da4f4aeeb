"""`deadwatch check` on saved models of every supported format: certified units, --data, --against,
--prune, --json, exit codes; 2 with one line for unreadable, unsupported or refused files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checkmodels
from deadwatch import cli

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MODEL = "checkmodels:build"
SHAPE = ("--input-shape", "2,3,8,8")    # the head reads 8x8 inputs: the 32x32 dummy input would not fit


def check(capsys, *args):
    code = cli.main(["check", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def check_json(capsys, *args):
    code, out, err = check(capsys, *args, "--json")
    return code, json.loads(out), err


def certified(doc):
    return {layer["name"]: layer["certified_units"] for layer in doc["report"]["layers"] if layer["certified_units"]}


@pytest.fixture
def saved(tmp_path):
    sd = tmp_path / "planted.pt"
    torch.save(checkmodels.planted().state_dict(), sd)
    return sd


def test_state_dict_with_model(capsys, saved):
    code, out, _ = check(capsys, saved, "--model", MODEL, *SHAPE)
    assert code == 0
    assert "3 certified unit(s), no data (dead = certified)" in out
    assert "2: 2 certified (dead for every input, cannot recover): 1, 3" in out
    code, doc, _ = check_json(capsys, saved, "--model", MODEL, *SHAPE)
    assert code == 0 and doc["structure"] is True and doc["format"] == "state dict"
    assert certified(doc) == checkmodels.CERTIFIED
    dead = {layer["name"]: layer["dead_units"] for layer in doc["report"]["layers"]}
    assert dead == {"2": [1, 3], "4": [2]}          # no data: dead means certified


def test_data_against_prune(capsys, saved, tmp_path):
    base = tmp_path / "base.pt"
    torch.save(checkmodels.build().state_dict(), base)
    out_path = tmp_path / "pruned.pt"
    code, doc, _ = check_json(capsys, saved, "--model", MODEL, *SHAPE, "--data", "checkmodels:data", "--against", base,
                              "--prune", out_path)
    assert code == 0
    dead = {layer["name"]: layer["dead_units"] for layer in doc["report"]["layers"]}
    assert dead == {"2": [1, 3], "4": [2, 4]}                     # 4: dead on the data only
    assert certified(doc) == checkmodels.CERTIFIED
    assert doc["against"]["newly_certified"] == checkmodels.CERTIFIED
    assert doc["against"]["newly_dead"]["4"] == [2, 4]
    assert doc["prune"]["removed"] == checkmodels.CERTIFIED and doc["prune"]["max_difference"] <= 1e-5
    pruned = torch.load(out_path, weights_only=True)
    assert pruned["0.weight"].shape[0] == 6 and pruned["3.weight"].shape[:2] == (5, 6)
    code, out, _ = check(capsys, saved, "--model", MODEL, *SHAPE, "--data", "checkmodels:data", "--against", base)
    assert "newly certified since" in out and "2: 1, 3; 4: 2" in out
    assert "newly dead on the data since" in out and "4: 2, 4" in out


@pytest.mark.parametrize("fail_on, data, code", [("certified", False, 1), ("dead", False, 1), ("never", False, 0),
                                                 ("certified", True, 1), ("dead", True, 1)])
def test_fail_on(capsys, saved, fail_on, data, code):
    args = [saved, "--model", MODEL, *SHAPE, "--fail-on", fail_on] + (["--data", "checkmodels:data"] if data else [])
    got, _, err = check(capsys, *args)
    assert got == code
    if code:
        assert err.strip() == f"deadwatch: 2 site(s) with {fail_on} units: 2, 4"


def test_fail_on_dead_only_on_data(capsys, tmp_path):
    torch.manual_seed(0)
    m = checkmodels.build()
    with torch.no_grad():
        m[3].bias[4] = -100.0
    path = tmp_path / "m.pt"
    torch.save(m.state_dict(), path)
    assert check(capsys, path, "--model", MODEL, *SHAPE, "--fail-on", "certified", "--data", "checkmodels:data")[0] == 0
    assert check(capsys, path, "--model", MODEL, *SHAPE, "--fail-on", "dead", "--data", "checkmodels:data")[0] == 1
    assert check(capsys, path, "--model", MODEL, *SHAPE, "--fail-on", "dead")[0] == 0   # no data: nothing proved


def test_safetensors(capsys, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "m.safetensors"
    save_file(checkmodels.planted().state_dict(), str(path))
    code, doc, _ = check_json(capsys, path, "--model", MODEL, *SHAPE)
    assert code == 0 and doc["format"] == "safetensors" and certified(doc) == checkmodels.CERTIFIED


def test_suspects_without_structure(capsys, saved, tmp_path):
    code, out, _ = check(capsys, saved)
    assert code == 0 and "suspects are unproved" in out and "certified" not in out.replace("nothing is certified", "")
    code, doc, _ = check_json(capsys, saved)
    assert doc["structure"] is False and "report" not in doc
    assert {s["tensor"]: s["suspects"] for s in doc["suspects"]} == {"1": [1, 3], "3": [2]}
    base = tmp_path / "base.pt"
    torch.save(checkmodels.build().state_dict(), base)
    code, doc, _ = check_json(capsys, saved, "--against", base)
    assert doc["against"]["new_suspects"] == {"1": [1, 3], "3": [2]}
    assert check(capsys, saved, "--fail-on", "certified")[0] == 0          # suspects are never certified


def test_suspect_rules():
    from deadwatch.check import suspects

    state = {"n.weight": torch.tensor([0.0, 1e-9, 1.0, 0.0]), "n.bias": torch.tensor([-1.0, 0.0, -1.0, 1.0]),
             "n.running_mean": torch.zeros(4), "l.weight": torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]]),
             "l.bias": torch.tensor([0.0, -1.0, 0.5]), "e.weight": torch.zeros(3, 2)}
    found = {s.tensor: s.suspects for s in suspects(state)}
    assert found == {"n": [0, 1], "l": [0], "e": [0, 1, 2]}   # e: zero rows, no bias


def test_lightning_checkpoint(capsys, tmp_path):
    L = pytest.importorskip("lightning")

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = checkmodels.planted()

        def training_step(self, batch, _):
            return self.net(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    module = Module()
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path)
    trainer.fit(module, torch.utils.data.DataLoader(checkmodels.data(), batch_size=None))
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    capsys.readouterr()
    code, doc, _ = check_json(capsys, path, "--model", MODEL, *SHAPE)   # keys carry Lightning's "net." prefix
    assert code == 0 and doc["format"] == "lightning" and certified(doc) == checkmodels.CERTIFIED


def test_whole_model_needs_trust(capsys, tmp_path):
    path = tmp_path / "whole.pth"
    torch.save(checkmodels.planted(), path)
    code, _, err = check(capsys, path)
    assert code == 2 and err.count("\n") == 1 and "refused" in err and "--trust" in err
    code, doc, _ = check_json(capsys, path, "--trust", *SHAPE)
    assert code == 0 and doc["format"] == "whole model" and certified(doc) == checkmodels.CERTIFIED
    out_path = tmp_path / "pruned.pth"
    code, _, _ = check(capsys, path, "--trust", "--prune", out_path, *SHAPE)
    pruned = torch.load(out_path, weights_only=False)
    assert isinstance(pruned, torch.nn.Module) and pruned[0].out_channels == 6


def hf_folder(tmp_path, kind):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "bert":
        config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=24, max_position_embeddings=32, hidden_act="relu")
        model = transformers.BertModel(config)
        dense = model.encoder.layer[1].intermediate.dense
        with torch.no_grad():
            dense.weight[[3, 9]] = 0.0
            dense.bias[[3, 9]] = -0.5
        site = "encoder.layer.1.intermediate.intermediate_act_fn"
    else:
        config = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                         activation_function="relu", bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(config)
        with torch.no_grad():
            model.transformer.h[0].mlp.c_fc.weight[:, [5]] = 0.0
            model.transformer.h[0].mlp.c_fc.bias[5] = -0.5
        site = "transformer.h.0.mlp.act"
    folder = tmp_path / kind
    model.save_pretrained(folder)
    return folder, site


@pytest.mark.parametrize("kind, units", [("bert", [3, 9]), ("gpt2", [5])])
def test_hugging_face_folder(capsys, tmp_path, kind, units):
    folder, site = hf_folder(tmp_path, kind)
    pruned = tmp_path / "pruned.pt"
    code, doc, _ = check_json(capsys, folder, "--fail-on", "certified", "--prune", pruned)  # stdout: JSON only
    assert code == 1 and doc["format"] == "hugging face"
    assert certified(doc) == {site: units}
    if kind == "bert":
        assert doc["prune"]["removed"] == {site: units} and doc["prune"]["max_difference"] <= 1e-5
    else:
        assert "Conv1D" in doc["prune"]["skipped"][site]


def test_bad_inputs_exit_2_with_one_line(capsys, tmp_path, saved):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    folder = tmp_path / "folder"
    folder.mkdir()
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    mixed = tmp_path / "mixed.pt"
    torch.save({"epoch": 3, "weights": checkmodels.build().state_dict()}, mixed)
    cases = [
        ([tmp_path / "missing.pt"], "no such file or folder"),
        ([garbage], "cannot read"),
        ([text], "unsupported file type '.txt'"),
        ([folder], "without config.json"),
        ([tensor], "holds a Tensor, not a state dict"),
        ([mixed], "holds a dict, not a state dict (name -> tensor)"),
        ([saved, "--model", "nomodule_here:build"], "cannot import it"),
        ([saved, "--model", "checkmodels"], "must be MODULE:CALLABLE"),
        ([saved, "--model", "checkmodels:not_a_module"], "returned a str, not a torch.nn.Module"),
        ([saved, "--model", "checkmodels:CERTIFIED"], "is not callable"),
        ([saved, "--data", "checkmodels:data"], "need the model's structure"),
        ([saved, "--model", MODEL, *SHAPE, "--data", "checkmodels:not_iterable"], "which is not iterable"),
        ([saved, "--model", MODEL, "--input-shape", "1,x"], "--input-shape '1,x' must be positive integers"),
        ([saved, "--model", MODEL], "the model failed on a dummy input (2, 3, 32, 32) (RuntimeError: mat1 and mat2"),
        ([folder, "--model", MODEL, *SHAPE], "--model is for state dicts"),
        ([saved, "--model", MODEL, *SHAPE, "--prune", tmp_path / "no" / "such" / "dir.pt"], "cannot write it"),
    ]
    for args, message in cases:
        code, out, err = check(capsys, *args)
        assert code == 2, (args, out, err)
        assert err.count("\n") == 1 and message in err, (args, err)
    wrong = tmp_path / "wrong.pt"
    torch.save(torch.nn.Linear(3, 2).state_dict(), wrong)
    code, _, err = check(capsys, wrong, "--model", MODEL)
    assert code == 2 and "does not fit the --model architecture" in err and err.count("\n") == 1


def test_input_shape(capsys, tmp_path):
    from deadwatch.check import CheckError, example_input

    class NoHint(torch.nn.Module):
        def forward(self, x):
            return x * 2

    with pytest.raises(CheckError, match="pass --input-shape"):
        example_input(NoHint(), None)
    recurrent = torch.nn.Sequential(torch.nn.GRU(4, 8), torch.nn.Linear(8, 2))
    with pytest.raises(CheckError, match="pass --input-shape"):   # not from a later layer: it reads other shapes
        example_input(recurrent, None)
    assert example_input(NoHint(), (2, 5)).shape == (2, 5)
    assert example_input(torch.nn.Sequential(torch.nn.Embedding(7, 3)), None).dtype == torch.long
    assert example_input(torch.nn.Sequential(torch.nn.Conv1d(4, 2, 3)), None).shape == (2, 4, 32)


def test_script_one_line_no_traceback(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(checkmodels.planted(), path)
    done = subprocess.run([str(BIN / "deadwatch"), "check", str(path)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and "Traceback" not in done.stderr and done.stderr.count("\n") == 1
    done = subprocess.run([str(BIN / "deadwatch"), "check", str(path), "--trust", "--json", "--model",
                           "tests/checkmodels.py:build"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and "holds a whole model" in done.stderr
