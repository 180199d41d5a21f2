"""Split the offline instruction set for the QAT measurement of docs/compression.md: the first conversations
train, the last 32 are held out, rendered with the model's own chat template as {"text": ...} lines that
`megaloom eval --task perplexity` scores (the first 16 of them, for a shared two-core CPU).

    .venv/bin/python tools/qat_heldout.py runs/stdlib-instruct.jsonl OUT_DIR MODEL
    -> OUT_DIR/train.jsonl, OUT_DIR/held16.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from megaloom.data.chat import ChatTemplate, template_variables
from megaloom.data.tokenizer import pretrained_tokenizer

HELD, SCORED = 32, 16


def main(source: str, out: str, model: str) -> None:
    lines = Path(source).read_text(encoding="utf-8").splitlines()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "train.jsonl").write_text("\n".join(lines[:-HELD]) + "\n", encoding="utf-8")
    tok = pretrained_tokenizer(model)
    template = ChatTemplate(tok.chat_template, f"{model}'s chat template")
    rows = [json.dumps({"text": template.render(json.loads(line)["messages"], variables=template_variables(tok))})
            for line in lines[-HELD:][:SCORED]]
    (out_dir / "held16.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    print(f"wrote {out_dir}/train.jsonl ({len(lines) - HELD} conversations) and {out_dir}/held16.jsonl ({SCORED})")


if __name__ == "__main__":
    main(*sys.argv[1:4])
