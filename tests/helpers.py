"""Tiny random causal LMs built locally (no download), shared by the pipeline and serving tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from tsq_vllm.quantize.options import QuantizeOptions

_WORDS = (
    "the of and to in is was for on as with by he at from his an were are which this also be "
    "has had or first one their its new after who they two her she been other when there all "
    "during into school time may years more most only over city some world would where later up "
    "such used many can state about national out known university united then made"
).split()

ARCHS = ("llama", "qwen2", "mistral")


def corpus(n_lines: int = 200, seed: int = 0) -> list[str]:
    """Deterministic pseudo-English lines, for calibration and tokenizer training in tests."""
    g = torch.Generator().manual_seed(seed)
    lines = []
    for _ in range(n_lines):
        idx = torch.randint(
            len(_WORDS), (int(torch.randint(8, 40, (1,), generator=g)),), generator=g
        )
        lines.append(" ".join(_WORDS[i] for i in idx.tolist()).capitalize() + ".")
    return lines


def make_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer trained offline, with a chat template, as a transformers
    tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% "
        "endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return fast


def make_config(
    arch: str = "llama",
    *,
    hidden: int = 128,
    intermediate: int = 256,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    vocab_size: int = 384,
    tie_word_embeddings: bool = False,
    **extra,
):
    """A tiny `arch` config; `extra` sets (or overrides) any other field of its config class."""
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config

    cls = {
        "llama": LlamaConfig,
        "qwen2": Qwen2Config,
        "mistral": MistralConfig,
        "phi3": Phi3Config,
        "gemma3": Gemma3TextConfig,
    }[arch]
    fields = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return cls(**{**fields, **extra})


def make_tiny_model(
    path: str | Path,
    arch: str = "llama",
    *,
    seed: int = 0,
    dtype=torch.float32,
    max_shard_size: str | None = None,
    **cfg,
) -> Path:
    """Save a tiny random `arch` causal LM with a trained tokenizer under `path`; returns the path.

    `max_shard_size` (e.g. "200KB") saves it as safetensors shards with an index.

    Weights are drawn with a larger spread than the default init so that quantization error is
    visible in the logits, and greedy decoding does not collapse onto one token.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    torch.manual_seed(seed)
    config = make_config(arch, **cfg)
    config.torch_dtype = dtype
    model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.08)
    shard = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **shard)
    make_tokenizer(config.vocab_size).save_pretrained(path)
    (path / "calib.txt").write_text("\n".join(corpus(64, seed=1)))
    return path


def single_thread():
    """Generator for a module-scoped autouse fixture: tiny models run faster on one torch thread
    (thread start-up costs more than it saves, and CI cores are shared)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def opts_for(model_dir: Path, output: Path, **kw) -> QuantizeOptions:
    """Quick quantization options for a `make_tiny_model` directory; `kw` overrides any field."""
    from tsq_vllm.quantize.options import QuantizeOptions

    base = dict(
        model=str(model_dir),
        output=str(output),
        calib=f"text:{model_dir}/calib.txt",
        nsamples=8,
        seqlen=64,
        batch_size=4,
        clip_points=20,
    )
    return QuantizeOptions(**{**base, **kw})


def linear_prefixes(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The quantized linears of a checkpoint's tensors, by name."""
    return sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))


def quantize_in_memory(opts: QuantizeOptions) -> tuple[torch.nn.Module, Any]:
    """The whole source model loaded in memory and quantized in place with `opts` (no
    checkpoint written), and its `QuantizeResult`: the in-memory quantized model a streamed run
    (`run_quantization`, whose `job.model` is a released skeleton) does not keep."""
    from tsq_vllm.data import load_documents, sample_windows, tokenize_documents
    from tsq_vllm.models import load_model, load_tokenizer, resolve_source
    from tsq_vllm.quantize.pipeline import quantize_model

    src = resolve_source(opts.model)
    docs = load_documents(opts.calib, split="calib")
    windows = sample_windows(
        tokenize_documents(load_tokenizer(src), docs), opts.nsamples, opts.seqlen, opts.seed
    )
    model = load_model(src)
    return model, quantize_model(model, windows, opts)


def held_open(files) -> list[str]:
    """Memory maps and open file descriptors of this process on any of `files`."""
    names = {str(f.resolve()) for f in files}
    maps = [
        ln for ln in Path("/proc/self/maps").read_text().splitlines() if ln.split()[-1] in names
    ]
    fds = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            if str(fd.readlink()) in names:
                fds.append(str(fd))
        except OSError:
            pass
    return maps + fds
