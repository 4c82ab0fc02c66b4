"""A BOS-adding tokenizer end to end: the shards hold what `pipeline` and `pretrain generate` feed the model,
the export's config agrees with the tokenizer, and the tokenizer knows the model's context."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizers import processors
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, pipeline

import pretrain.generate
from pretrain.data import prepare_data
from pretrain.hub import export_checkpoint
from pretrain.train import train
from tests.conftest import FIXTURE_CORPUS, FIXTURE_TOKENIZER
from tests.train_utils import tiny_config

BOS = "<s>"


@pytest.fixture(scope="module")
def bos_run(tmp_path_factory, make_data_config):
    """A tokenizer whose template puts BOS first (like Llama's), data prepared with it, a run, its export."""
    root = tmp_path_factory.mktemp("bos")
    tokenizer = AutoTokenizer.from_pretrained(str(FIXTURE_TOKENIZER))
    tokenizer.add_special_tokens({"bos_token": BOS})
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tokenizer.bos_token_id)])
    tokenizer.save_pretrained(str(root / "tokenizer"))
    data = prepare_data(make_data_config(root / "data", tokenizer=str(root / "tokenizer"), seq_len=32), False)
    result = train(tiny_config(data, root / "run", "train.steps=4"))
    return data, result.checkpoint, export_checkpoint(result.checkpoint, root / "export")


def test_shards_pipeline_and_generate_see_the_same_tokens_and_loss(bos_run, read_split, monkeypatch):
    data, checkpoint, exported = bos_run
    pipe = pipeline("text-generation", model=str(exported), device="cpu")
    bos, eos = pipe.tokenizer.bos_token_id, pipe.tokenizer.eos_token_id
    # The training stream: documents that start with BOS and end with EOS.
    stream = np.concatenate([read_split(data, "train"), read_split(data, "val")]).tolist()
    ends = [i for i, t in enumerate(stream) if t == eos]
    documents = [stream[a + 1:b + 1] for a, b in zip([-1, *ends], ends, strict=False)]
    assert documents and all(doc[0] == bos and doc.count(bos) == 1 for doc in documents)

    text = (FIXTURE_CORPUS / "bisect.py.1.txt").read_text()
    seen = {}
    real_from_pretrained = AutoTokenizer.from_pretrained

    def recording(path, *args, **kwargs):  # the tokenizer `pretrain generate` loads, as it loads it
        tokenizer = real_from_pretrained(path, *args, **kwargs)
        seen["generate"] = tokenizer(text, return_tensors="pt").input_ids[0].tolist()
        return tokenizer

    monkeypatch.setattr(pretrain.generate.AutoTokenizer, "from_pretrained", recording)
    pretrain.generate.generate_text(checkpoint, text[:20], max_new_tokens=1)
    seen["pipeline"] = pipe.tokenizer(text).input_ids
    assert seen["pipeline"] == seen["generate"]
    assert seen["pipeline"] + [eos] in documents  # exactly what training saw for this document

    ids = torch.tensor([seen["pipeline"][:64]])
    losses = []
    for model in (pipe.model, AutoModelForCausalLM.from_pretrained(checkpoint / "model")):
        with torch.no_grad():
            logits = model.eval()(input_ids=ids).logits
        losses.append(F.cross_entropy(logits[0, :-1], ids[0, 1:]).item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_config_ids_and_max_length_agree_with_the_tokenizer(bos_run):
    _, checkpoint, exported = bos_run
    for folder in (checkpoint / "model", exported):
        config = AutoConfig.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(exported if folder == exported else checkpoint / "tokenizer")
        assert (config.bos_token_id, config.eos_token_id) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
        assert config.bos_token_id != config.eos_token_id
        assert tokenizer.model_max_length == config.max_position_embeddings


def test_a_prompt_longer_than_the_context_is_cut_to_it_by_pipeline(bos_run):
    _, _, exported = bos_run
    pipe = pipeline("text-generation", model=str(exported), device="cpu")
    context = pipe.model.config.max_position_embeddings
    prompt = " ".join(["word"] * (context + 100))
    assert len(pipe.tokenizer(prompt).input_ids) > context
    # "hole" keeps the last model_max_length - new tokens of the prompt: only right with a real model_max_length.
    out = pipe(prompt, max_new_tokens=2, do_sample=False, handle_long_generation="hole", return_tensors=True)
    assert len(out[0]["generated_token_ids"]) == context


def test_the_prepared_tokenizer_records_the_data_context(tiny_data_dir):
    assert AutoTokenizer.from_pretrained(Path(tiny_data_dir) / "tokenizer").model_max_length == 256
