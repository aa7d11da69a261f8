"""Chat with a trained student (or the dialogue teacher) in the terminal or through a pipe.

    python launch/chat.py --model runs/distill/hf [--catalog runs/distill/hf/items.json] \
        [--mode auto|rec|gen] [--decoding greedy|beam|sample] [key=value ...]
    printf 'hi\nI love horror movies\n' | python launch/chat.py --model runs/distill/hf

Commands while chatting: /mode rec|gen|auto, /reset, /help, /quit. Item tokens are shown as
titles from the catalog that travels with the model (items.json, see
conkd_scale/eval/catalog_io.py). key=value: GenerationSettings fields (e.g. top_p=0.8).
"""

from __future__ import annotations

import argparse
import sys

from conkd_scale.config import build_config
from conkd_scale.data.schema import ItemCatalog
from conkd_scale.eval.catalog_io import load_item_catalog
from conkd_scale.eval.chat import ChatSession, run_chat
from conkd_scale.eval.generation import GenerationSettings, build_generator
from conkd_scale.utils.errors import ConkdError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="exported HF model directory")
    p.add_argument("--catalog", help="items.json or its directory (default: the model dir)")
    p.add_argument("--mode", choices=["auto", "rec", "gen"], default="auto")
    p.add_argument("--decoding", choices=["greedy", "beam", "sample"], default="greedy")
    p.add_argument("--device", default="auto")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bar between the user and the chat
    try:
        settings = build_config(
            GenerationSettings,
            None,
            [f"decoding={args.decoding}", "progress=false", *args.overrides],
        )
        try:
            catalog = load_item_catalog(args.catalog or args.model)
        except ConkdError as e:
            if args.catalog:
                raise
            print(f"warning: {e}; item tokens are shown as they are", file=sys.stderr)
            catalog = ItemCatalog([])
        generator = build_generator(args.model, settings, device=args.device)
        session = ChatSession(generator, catalog)
        msg, _ = session.command(f"/mode {args.mode}")
        if args.mode != "auto" and not msg.startswith("mode:"):
            raise ConkdError(msg)
    except ConkdError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return run_chat(session)


if __name__ == "__main__":
    sys.exit(main())
