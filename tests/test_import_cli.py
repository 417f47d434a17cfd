"""``attnlab import`` end to end: tiny GPT-2 and Llama checkpoints made with ``transformers`` (``save_pretrained``)
plus a tiny byte-level BPE tokenizer become ordinary workdirs that ``attnlab eval``, ``sinks``, ``stream`` and
``train`` (after adding a sink logit / an output gate) use unchanged, and ``attnlab.app.load`` gives their models;
bad inputs are one clear line each and write nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from attnlab.app import load  # noqa: E402
from attnlab.app.loading import REPLACED  # noqa: E402
from attnlab.cli import main  # noqa: E402
from attnlab.data.tokenizer import make_tokenizer  # noqa: E402
from attnlab.pretrained import read_safetensors, write_safetensors  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = ["the quick brown fox jumps over the lazy dog", "attention sinks appear in language models"] * 3
SMALL = ["--gin.MeshConfig.data=1"]  # conftest gives 8 CPU devices; these runs use one


def _tokenizer(directory: str, *, eos: str, bos: str | None) -> int:
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(vocab_size=270, special_tokens=[eos] + ([bos] if bos else []),
                                           initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(TEXT, trainer)
  tok.save(os.path.join(directory, "tokenizer.json"))
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"eos_token": eos, "bos_token": bos}, f)
  return tok.get_vocab_size()


def make_source(directory: str, family: str) -> str:
  os.makedirs(directory, exist_ok=True)
  torch.manual_seed(0)
  if family == "gpt2":
    n = _tokenizer(directory, eos="<|endoftext|>", bos=None)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=n + 3, bos_token_id=0, eos_token_id=0, n_positions=64, n_embd=32, n_layer=2, n_head=2))
  else:
    n = _tokenizer(directory, eos="</s>", bos="<s>")
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=n, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=1,
        eos_token_id=0))
  model.save_pretrained(directory)
  return directory


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  root = tmp_path_factory.mktemp("hf")
  return {f: make_source(str(root / f), f) for f in ("gpt2", "llama")}


@pytest.fixture(scope="module")
def imported(sources, tmp_path_factory):
  root = tmp_path_factory.mktemp("runs")
  out = {}
  for family, src in sources.items():
    out[family] = str(root / family)
    assert main(["import", "--hf", src, "--workdir", out[family]]) == 0
  return out


def _hf_logits(src: str, ids: np.ndarray) -> np.ndarray:
  model = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.numpy()


def _params(model) -> dict:
  leaves = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_import_writes_an_ordinary_workdir(family, sources, imported, capsys):
  w = imported[family]
  for name in ("config.gin", "operative_config.gin", "run_config.txt", "import.json", "tokenizer/tokenizer.json",
               "checkpoints/0"):
    assert os.path.exists(os.path.join(w, name)), name
  model, cfg = load(w)
  ids = np.random.RandomState(0).randint(0, cfg.model.vocab_size, (2, 24))
  want = _hf_logits(sources[family], ids)
  got = np.asarray(model(jnp.asarray(ids, jnp.int32)))
  assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
  tok = make_tokenizer(cfg.data.tokenizer)  # the workdir's copy, specials from the checkpoint's own files
  assert cfg.data.tokenizer == os.path.join(w, "tokenizer")
  eos = "<|endoftext|>" if family == "gpt2" else "</s>"
  assert tok.eos_id == tok._tok.token_to_id(eos) and tok.vocab_size <= cfg.model.vocab_size
  assert tok.bos_id == (tok.eos_id if family == "gpt2" else tok._tok.token_to_id("<s>"))
  assert main(["import", "--hf", sources[family], "--workdir", w]) == 0  # the same import again: a no-op
  assert "already holds this import" in capsys.readouterr().out


@pytest.mark.parametrize("family", ["gpt2", pytest.param("llama", marks=pytest.mark.slow)])
def test_eval_sinks_stream_on_an_import(family, imported, capsys):
  w = imported[family]
  assert main(["eval", "--workdir", w]) == 0
  assert np.isfinite(json.load(open(os.path.join(w, "eval.json")))["heldout"]["loss"])
  assert main(["sinks", "--workdir", w, "--gin.AnalysisConfig.num_sequences=4", "--gin.AnalysisConfig.seq_len=32"]) == 0
  assert os.path.isfile(os.path.join(w, "sinks.json"))
  capsys.readouterr()
  rc = main(["stream", "--workdir", w, "--length", "48", "--streams", "1", "--window", "16", "--sinks", "4"])
  if family == "gpt2":  # learned absolute positions: a cache cannot re-position them (StreamingLLM needs RoPE)
    assert rc == 2 and "learned absolute position" in capsys.readouterr().err
  else:
    assert rc == 0 and os.path.isfile(os.path.join(w, "streaming", "streaming.json"))


def _train(w, *extra):
  return ["train", "--workdir", w, "--gin_file", os.path.join(w, "config.gin"), "--gin.TrainConfig.steps=2",
          "--gin.DataConfig.batch_size=2", "--gin.TrainConfig.eval_at_end=False", "--gin.TrainConfig.progress=False",
          *SMALL, *extra]


@pytest.mark.parametrize("family,change,new", [("llama", "AttentionConfig.sink_logit=True", "sink_logits"),
                                               pytest.param("gpt2", "AttentionConfig.gate='headwise'", "gate",
                                                            marks=pytest.mark.slow)])
def test_train_after_adding_parameters(family, change, new, imported, tmp_path, capsys):
  w, w2 = str(tmp_path / family), str(tmp_path / (family + "_new"))
  shutil.copytree(imported[family], w)
  shutil.copytree(imported[family], w2)
  before, _ = load(w)
  pb = _params(before)
  assert main(_train(w)) == 2 and "different configuration" in capsys.readouterr().err  # steps differ: --force
  assert main(_train(w, "--force")) == 0  # continued training of the imported model, nothing to adapt
  out = capsys.readouterr().out
  assert "finished at step 2" in out and "initialised" not in out
  assert main(_train(w2, f"--gin.{change}", "--force")) == 0  # + new parameters: restore what exists, init the new
  out = capsys.readouterr().out
  assert "restored" in out and "initialised" in out and new in out and "finished at step 2" in out, out
  assert os.path.isdir(os.path.join(w2, REPLACED, "0"))
  at0, cfg = load(w2, step=0)  # the adapted step 0: imported params restored, the new ones initialised
  assert cfg.model.attention.sink_logit if family == "llama" else cfg.model.attention.gate == "headwise"
  p0 = _params(at0)
  added = sorted(set(p0) - set(pb))
  assert added and all(new in k for k in added) and set(pb) <= set(p0), added
  for k, v in pb.items():
    np.testing.assert_array_equal(p0[k], v)
  assert all(np.isfinite(p0[k]).all() for k in added)
  trained = _params(load(w2)[0])  # newest: step 2
  assert any(not np.array_equal(trained[k], v) for k, v in pb.items())


def _one_line_error(args, capsys, match):
  assert main(args) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and match in err, err
  return err


def _copy(src, dst, **edit_config):
  shutil.copytree(src, dst)
  if edit_config:
    path = os.path.join(dst, "config.json")
    c = json.load(open(path))
    c.update(edit_config)
    json.dump(c, open(path, "w"))
  return str(dst)


def test_bad_inputs_are_one_line_and_write_nothing(sources, imported, tmp_path, capsys):
  llama = sources["llama"]
  w = str(tmp_path / "w")
  cases = []
  d = _copy(llama, tmp_path / "noconfig")
  os.remove(os.path.join(d, "config.json"))
  cases.append((d, "has no config.json"))
  d = _copy(llama, tmp_path / "noweights")
  os.remove(os.path.join(d, "model.safetensors"))
  cases.append((d, "safetensors"))
  cases.append((_copy(llama, tmp_path / "type", model_type="mamba"), "model_type"))
  cases.append((_copy(llama, tmp_path / "rope", rope_parameters={"rope_type": "yarn", "factor": 4.0}), "yarn"))
  cases.append((_copy(llama, tmp_path / "rope2", rope_scaling={"type": "yarn", "factor": 4.0}), "disagrees"))
  d = _copy(llama, tmp_path / "trunc")
  with open(os.path.join(d, "model.safetensors"), "r+b") as f:
    f.truncate(os.path.getsize(os.path.join(d, "model.safetensors")) - 100)
  cases.append((d, "model.safetensors"))
  d = _copy(llama, tmp_path / "shape")
  t = read_safetensors(os.path.join(d, "model.safetensors"))
  t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"][:-1]
  write_safetensors(os.path.join(d, "model.safetensors"), t)
  cases.append((d, "model.layers.0.mlp.up_proj.weight"))
  cases.append((_copy(llama, tmp_path / "vocab", vocab_size=100), "ModelConfig.vocab_size (100)"))
  d = _copy(llama, tmp_path / "notok")
  os.remove(os.path.join(d, "tokenizer.json"))
  cases.append((d, "no tokenizer.json"))
  cases.append((str(tmp_path / "missing" / "dir"), "neither a local directory nor"))
  for src, match in cases:
    _one_line_error(["import", "--hf", src, "--workdir", w], capsys, match)
    assert not os.path.exists(w), src
  _one_line_error(["import", "--hf", llama, "--workdir", w, "--revision", "step1000"], capsys, "--revision")
  assert not os.path.exists(w)
  os.makedirs(w)
  open(os.path.join(w, "notes.txt"), "w").close()
  _one_line_error(["import", "--hf", llama, "--workdir", w], capsys, "not empty")
  assert os.listdir(w) == ["notes.txt"]
  listing = sorted(os.listdir(imported["gpt2"]))
  _one_line_error(["import", "--hf", llama, "--workdir", imported["gpt2"]], capsys, "different configuration")
  assert sorted(os.listdir(imported["gpt2"])) == listing
  listing = sorted(os.listdir(imported["llama"]))  # same config, other weights (e.g. another revision)
  _one_line_error(["import", "--hf", _copy(llama, tmp_path / "other"), "--workdir", imported["llama"]], capsys,
                  "not this import")
  assert sorted(os.listdir(imported["llama"])) == listing
  assert not [p for p in os.listdir(tmp_path) if ".import-" in p]  # no leftover staging folder


def test_revision_that_does_not_exist(tmp_path, capsys, monkeypatch):
  huggingface_hub = pytest.importorskip("huggingface_hub")
  httpx = pytest.importorskip("httpx2")  # huggingface_hub 2.x speaks httpx2
  from huggingface_hub import errors

  def fake(repo_id, revision=None, **kw):  # what the hub answers for a missing revision
    response = httpx.Response(404, request=httpx.Request("GET", f"https://huggingface.co/api/models/{repo_id}"))
    raise errors.RevisionNotFoundError(f"Invalid rev id: {revision}", response=response)

  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
  _one_line_error(["import", "--hf", "EleutherAI/pythia-14m", "--revision", "step999999", "--workdir",
                   str(tmp_path / "w")], capsys, "revision 'step999999' does not exist for EleutherAI/pythia-14m")
  assert not os.path.exists(tmp_path / "w")


_OFFLINE = """
import sys
from attnlab.cli import main
w = sys.argv[1]
assert main(["import", "--hf", "attnlab-test/tiny-llama", "--workdir", w + "/hub"]) == 0
assert main(["import", "--hf", "attnlab-test/tiny-llama", "--revision", "step1000", "--workdir", w + "/rev"]) == 2
assert main(["import", "--hf", "attnlab-test/not-cached", "--workdir", w + "/none"]) == 2
"""


def test_hub_id_offline(sources, tmp_path):
  pytest.importorskip("huggingface_hub")
  cache = tmp_path / "cache" / "models--attnlab-test--tiny-llama"
  commit = "0123456789abcdef0123456789abcdef01234567"
  shutil.copytree(sources["llama"], cache / "snapshots" / commit)
  os.makedirs(cache / "refs")
  (cache / "refs" / "main").write_text(commit)
  env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "cache"), PYTHONPATH=ROOT,
             JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", _OFFLINE, str(tmp_path)], env=env, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  errs = [line for line in r.stderr.splitlines() if line.startswith("attnlab import: error")]
  assert len(errs) == 2, r.stderr[-2000:]
  assert "HF_HUB_OFFLINE=1" in errs[0] and "step1000" in errs[0] and "not-cached" in errs[1]
  assert json.load(open(tmp_path / "hub" / "import.json"))["commit"] == commit
  assert not (tmp_path / "rev").exists() and not (tmp_path / "none").exists()


def test_train_refuses_a_tokenizer_beyond_vocab_size(sources, tmp_path, capsys):
  # 258+ ids and "<s>"/"</s>"/"<pad>" appended after them, against the byte-level default vocab_size 259
  _one_line_error(["train", "--gin_file", "experiments/smoke_tiny.gin", "--workdir", str(tmp_path / "w"),
                   f"--gin.DataConfig.tokenizer='{sources['gpt2']}/tokenizer.json'"], capsys,
                  "do not fit ModelConfig.vocab_size (259)")


def test_pytorch_model_bin_checkpoint(sources, tmp_path):
  """Weights only as pytorch_model.bin (e.g. Pythia's step revisions) are read with torch, same logits."""
  src = str(tmp_path / "bin")
  shutil.copytree(sources["llama"], src)
  os.remove(os.path.join(src, "model.safetensors"))
  state = {k: torch.from_numpy(v.astype(np.float32)).to(torch.bfloat16 if "mlp" in k else torch.float32)
           for k, v in read_safetensors(os.path.join(sources["llama"], "model.safetensors")).items()}
  torch.save(state, os.path.join(src, "pytorch_model.bin"))
  w = str(tmp_path / "w")
  assert main(["import", "--hf", src, "--workdir", w]) == 0
  model, cfg = load(w)
  ref = transformers.AutoModelForCausalLM.from_pretrained(sources["llama"]).eval()
  with torch.no_grad():  # the reference with the same bf16-rounded MLP weights
    for k, v in ref.state_dict().items():
      if "mlp" in k:
        v.copy_(v.to(torch.bfloat16).float())
    ids = np.arange(20)[None] % cfg.model.vocab_size
    want = ref(torch.tensor(ids)).logits.numpy()
  got = np.asarray(model(jnp.asarray(ids, jnp.int32)))
  assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
