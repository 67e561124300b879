"""`dfplan generate`: text from any loadable model (packed or not), streamed to stdout."""
from __future__ import annotations

import json
import sys

import click


@click.command(name="generate", help="Generate text from any loadable model, streamed to stdout.")
@click.option("--model", "model_arg", required=True,
              help="Packed artifact dir, checkpoint dir, hub id, or preset:NAME (random init).")
@click.option("--prompt", default=None, help="Prompt text.")
@click.option("--prompt-file", default=None, type=click.Path(dir_okay=False), help="Read the prompt from a file.")
@click.option("--tokenizer", default=None, help="tokenizer.json, a folder holding one, or a hub id.")
@click.option("--max-new-tokens", default=64, show_default=True, type=int)
@click.option("--temperature", default=0.0, show_default=True, type=float, help="0 = greedy.")
@click.option("--top-k", default=0, show_default=True, type=int, help="0 = off.")
@click.option("--top-p", default=1.0, show_default=True, type=float, help="In (0, 1]; 1 = off.")
@click.option("--seed", default=None, type=int, help="Sampling seed (reproducible output).")
@click.option("--stop", multiple=True, help="Stop string (repeatable); not printed.")
@click.option("--state-dtype", default=None, type=click.Choice(["fp32", "bf16", "fp16"]),
              help="SSM state precision while decoding [the packed artifact plan's, else fp32].")
@click.option("--no-eos", is_flag=True, help="Do not stop at the end-of-text token.")
@click.option("--no-stream", is_flag=True, help="Print the text once at the end.")
@click.option("--device", default=None, help="cpu (default) or cuda.")
@click.option("--threads", default=None, type=click.IntRange(min=1), help="CPU threads (torch's, or the lite library's).")
@click.option("--stats", is_flag=True, help="Print prefill ms, decode tok/s and peak RSS to stderr.")
@click.option("--runtime", default="auto", show_default=True, type=click.Choice(["auto", "torch", "lite"]),
              help="lite: the torch-free library (packed pure-Mamba artifacts, CPU, ~225 MiB less memory); "
                   "auto: lite where it applies, else torch.")
def command(model_arg, prompt, prompt_file, tokenizer, max_new_tokens, temperature, top_k, top_p,
            seed, stop, state_dtype, no_eos, no_stream, device, threads, stats, runtime):
    from ..errors import DfplanError
    from ..prompting import read_prompt

    text = read_prompt(prompt, prompt_file)
    kw = dict(tokenizer=tokenizer, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
              top_p=top_p, seed=seed, stop=stop, state_dtype=state_dtype, stream=not no_stream,
              eos=not no_eos)
    if runtime != "torch":
        from ..lite.support import unsupported
        why = unsupported(model_arg) if device in (None, "cpu") else f"--device {device}"
        if why is None:
            from ..lite import native
            try:
                native.library()                 # no compiler: torch's reference path still runs
            except DfplanError as e:
                why = str(e)
        if runtime == "lite" and why:
            raise DfplanError(f"--runtime lite cannot run {model_arg}: {why}; use --runtime torch")
        runtime = "torch" if why else "lite"
    if runtime == "lite":
        from ..lite.generate import generate_to
        res = generate_to(sys.stdout, model_arg, text, threads=threads, **kw)
    else:
        from ..runtime.generate import generate_to
        if threads:
            import torch
            torch.set_num_threads(threads)
        res = generate_to(sys.stdout, model_arg, text, device=device, **kw)
    if stats:
        click.echo(f"prefill {res['prefill_ms']:.1f} ms ({res['prompt_tokens']} tokens), "
                   f"decode {res['decode_tok_s']:.2f} tok/s ({res['new_tokens']} tokens), "
                   f"peak RSS {res['peak_rss_bytes'] / 2**20:.1f} MiB, load {res['load_s']:.2f} s, "
                   f"SSM state {res['state_dtype']} ({res['state_dtype_from']}), runtime {res['runtime']}",
                   err=True)
        click.echo(json.dumps(res), err=True)
