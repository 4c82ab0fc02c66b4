"""`pretrain export` / `pretrain push`: the hub folder loads offline with the checkpoint's logits, the
model card, the dry run lists exactly the exported files, the upload calls, continued pretraining."""

import argparse
import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from pretrain.config import load_config
from pretrain.data import TrainLoader
from pretrain.errors import UserError
from pretrain.hub import add_export_parser, add_push_parser, export_checkpoint
from pretrain.train import train
from tests.train_utils import tiny_config


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def checkpoint(tiny_data_dir, tmp_path_factory):
    """A checkpoint of a tiny model with learnable gains (folded in model/), trained a few steps."""
    cfg = tiny_config(tiny_data_dir, tmp_path_factory.mktemp("hub") / "run", "model.linear_gains=true",
                      "train.steps=4", "optim.lr=1e-2")
    return train(cfg).checkpoint


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    return export_checkpoint(checkpoint, tmp_path_factory.mktemp("export") / "hub")


def cli(*argv: str) -> None:
    """`pretrain ARGV` through the export/push subparsers this module contributes to the CLI."""
    parser = argparse.ArgumentParser(prog="pretrain")
    sub = parser.add_subparsers(dest="command", required=True)
    add_export_parser(sub)
    add_push_parser(sub)
    args = parser.parse_args(argv)
    args.func(args)


def walk(folder):
    """{relative POSIX path: size} of every file under `folder`, by a plain directory walk."""
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def parse_listing(text: str) -> dict[str, int]:
    """The `size  path` lines of a dry run (the total line left out)."""
    files = {}
    for line in text.splitlines():
        size, sep, name = line.strip().partition("  ")
        if sep and size.replace(",", "").isdigit() and not name.startswith("total"):
            files[name] = int(size.replace(",", ""))
    return files


def test_export_loads_offline_with_the_checkpoints_logits(checkpoint, exported):
    model = AutoModelForCausalLM.from_pretrained(exported).eval()
    reference = AutoModelForCausalLM.from_pretrained(checkpoint / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(exported)
    reference_tokenizer = AutoTokenizer.from_pretrained(checkpoint / "tokenizer")
    text = "To be, or not to be: that is the question.\ndef main():\n    return 0"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert torch.equal(ids, reference_tokenizer(text, return_tensors="pt").input_ids)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    generation = GenerationConfig.from_pretrained(exported)
    assert generation.eos_token_id == tokenizer.eos_token_id == model.config.eos_token_id


def test_export_holds_model_tokenizer_rotation_config_and_data_manifest(checkpoint, exported, tiny_data_dir):
    files = walk(exported)
    copied = {p.name for p in (checkpoint / "model").iterdir()} | {p.name for p in (checkpoint / "tokenizer").iterdir()}
    rotation = {f"rotation/{p.name}" for p in (checkpoint / "rotation").iterdir()}
    extra = {"README.md", "generation_config.json", "training_config.yaml", "data_manifest.json"}
    assert set(files) == copied | rotation | extra
    assert load_config(exported / "training_config.yaml") == load_config(checkpoint / "config.yaml")
    index = json.loads((tiny_data_dir / "index.json").read_text())
    assert json.loads((exported / "data_manifest.json").read_text()) == index["source"]


def test_model_card_renders_rotation_table_data_and_figures(exported, tiny_data_dir):
    card = (exported / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "transformers"
    summary = json.loads((exported / "rotation" / "summary.json").read_text())
    table_rows = [line for line in card.splitlines() if line.startswith("| ")]
    for layer in summary["layers"]:
        assert any(row.startswith(f"| {layer['name']} |") for row in table_rows), layer["name"]
    images = [line.split("](")[1].rstrip(")") for line in card.splitlines() if line.startswith("![")]
    assert "rotation/heatmap.png" in images
    assert all((exported / image).is_file() for image in images)
    index = json.loads((tiny_data_dir / "index.json").read_text())
    assert f"{index['splits']['train']['num_tokens']:,} train" in card
    assert index["fingerprint"] in card
    assert "## Training config" in card and "linear_gains: true" in card


def test_export_refuses_a_non_empty_folder(checkpoint, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not an empty folder"):
        export_checkpoint(checkpoint, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


class RefusingApi:
    def __init__(self, *args, **kwargs):
        raise AssertionError("a dry run must not contact the hub")


def test_push_dry_run_lists_exactly_the_exported_files(checkpoint, exported, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.HfApi", RefusingApi)
    cli("push", str(checkpoint), "--repo-id", "me/tiny", "--dry-run")
    assert parse_listing(capsys.readouterr().out) == walk(exported)


def test_push_without_a_token_is_a_user_error(checkpoint, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr("huggingface_hub.HfApi", RefusingApi)
    with pytest.raises(UserError, match="hf auth login"):
        cli("push", str(checkpoint), "--repo-id", "me/tiny")


def test_push_uses_the_token_of_hf_auth_login(checkpoint, monkeypatch, tmp_path):
    calls = []

    class TokenApi(RefusingApi):
        def __init__(self, token):
            calls.append(token)
            raise RuntimeError("stop here")

    (tmp_path / "token").write_text("hf_stored\n")  # where `hf auth login` keeps it
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "token"))
    monkeypatch.setattr("huggingface_hub.HfApi", TokenApi)
    with pytest.raises(RuntimeError, match="stop here"):
        cli("push", str(checkpoint), "--repo-id", "me/tiny")
    assert calls == ["hf_stored"]


def test_push_creates_the_repo_and_uploads_the_export(checkpoint, exported, monkeypatch):
    calls = []

    class RecordingApi:
        def __init__(self, token):
            calls.append(("init", token))

        def create_repo(self, repo_id, private, exist_ok):
            calls.append(("create_repo", repo_id, private, exist_ok))

        def create_branch(self, repo_id, branch, exist_ok):
            calls.append(("create_branch", repo_id, branch, exist_ok))

        def upload_folder(self, repo_id, folder_path, revision, commit_message):
            calls.append(("upload_folder", repo_id, revision, walk(folder_path)))

    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.setattr("huggingface_hub.HfApi", RecordingApi)
    cli("push", str(checkpoint), "--repo-id", "me/tiny", "--private", "--revision", "step4")
    assert calls == [("init", "hf_test"), ("create_repo", "me/tiny", True, True),
                     ("create_branch", "me/tiny", "step4", True), ("upload_folder", "me/tiny", "step4", walk(exported))]


def test_a_failing_upload_is_a_user_error(checkpoint, monkeypatch):
    class FailingApi:
        def __init__(self, token):
            pass

        def create_repo(self, repo_id, private, exist_ok):
            raise PermissionError("403 Forbidden: you cannot write to me/tiny\nmore detail")

    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.setattr("huggingface_hub.HfApi", FailingApi)
    with pytest.raises(UserError) as err:
        cli("push", str(checkpoint), "--repo-id", "me/tiny")
    assert str(err.value) == "upload to me/tiny failed (PermissionError: 403 Forbidden: you cannot write to me/tiny)"


def test_export_cli_writes_the_folder(checkpoint, tmp_path, capsys):
    cli("export", str(checkpoint.parent.parent), str(tmp_path / "hub"))  # a run folder: its latest checkpoint
    assert parse_listing(capsys.readouterr().out) == walk(tmp_path / "hub")


def test_continued_pretraining_starts_from_the_exported_weights(exported, tiny_data_dir, tmp_path):
    no_checkpoints = ("train.steps=1", "checkpoint.save_final=false")
    cfg = tiny_config(tiny_data_dir, tmp_path / "continued", f"model.init_from={exported}", *no_checkpoints)
    continued = train(cfg)
    # The exported model's loss on the first training batch, computed here without the training loop.
    x, y = TrainLoader(tiny_data_dir, cfg.data.seq_len, cfg.train.micro_batch_size, cfg.train.grad_accum,
                       cfg.train.seed).get_batch(1, 0)
    model = AutoModelForCausalLM.from_pretrained(exported).eval()
    with torch.no_grad():
        expected = F.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten()).item()
    assert continued.losses[1] == pytest.approx(expected, rel=1e-5)
    fresh = train(tiny_config(tiny_data_dir, tmp_path / "fresh", *no_checkpoints))
    assert abs(fresh.losses[1] - expected) > 1e-3  # a fresh initialisation would not give that loss


def test_card_metadata_is_hub_metadata(checkpoint, tmp_path):
    out = export_checkpoint(checkpoint, tmp_path / "hub", license="apache-2.0")
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    val_loss = torch.load(checkpoint / "state" / "trainer.pt", weights_only=True)["val_loss"]
    assert front["license"] == "apache-2.0" and front["pipeline_tag"] == "text-generation"
    [result] = front["model-index"][0]["results"]
    assert result["metrics"][0] == {"type": "loss", "value": round(val_loss, 4), "name": "validation loss (nats/token)"}
    assert "datasets" not in front and "base_model" not in front  # local data, trained from scratch
    assert "github.com/)" not in card and "docs/" not in card  # no placeholder link, no doc outside the export


def test_card_names_hub_dataset_and_base_model():
    from huggingface_hub import ModelCardData

    from pretrain.card import card_metadata

    cfg = load_config(None, ["data.source=HuggingFaceFW/fineweb-edu", "model.init_from=openai-community/gpt2"])
    front = yaml.safe_load(card_metadata(cfg, None, "mit"))
    assert front["datasets"] == ["HuggingFaceFW/fineweb-edu"] and front["base_model"] == "openai-community/gpt2"
    assert front["license"] == "mit" and "model-index" not in front
    assert ModelCardData(**front).license == "mit"
