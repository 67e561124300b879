#!/bin/bash
# dfplan generate --stats, the lite and torch runtimes interleaved: threads x state x runtime,
# ROUNDS rounds, prompt = the first 100 GPT-NeoX tokens of tiny-shakespeare, 128 new tokens.
#   tools/generate_ab.sh [PACKED_DIR] [ROUNDS]      (default runs/packed-1.3b, 2)
# Each line ends with the stats line (prefill ms, decode tok/s, peak RSS, runtime) and starts
# with the load average at its start.
set -euo pipefail
MODEL=${1:-runs/packed-1.3b}
ROUNDS=${2:-2}
SHARED=${SHARED:-../shared}
TOK=$SHARED/data/tokenizers/gpt-neox-20b/20B_tokenizer.json
PROMPT=$(mktemp)
trap 'rm -f "$PROMPT"' EXIT
.venv/bin/python - "$TOK" "$SHARED/data/corpora/tinyshakespeare/input.txt" "$PROMPT" <<'PY'
import sys
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
text = tok.decode(tok.encode(open(sys.argv[2]).read()[:4000]).ids[:100])
while len(tok.encode(text).ids) > 100:
    text = text[:-1]
open(sys.argv[3], "w").write(text)
PY
for rep in $(seq "$ROUNDS"); do
  for th in 1 2; do
    for st in fp32 bf16; do
      for rt in lite torch; do
        echo -n "round $rep threads $th state $st load $(cut -d' ' -f1 /proc/loadavg): "
        .venv/bin/dfplan generate --model "$MODEL" --tokenizer "$TOK" --prompt-file "$PROMPT" \
          --max-new-tokens 128 --no-eos --no-stream --stats --runtime $rt --threads $th \
          --state-dtype $st 2>&1 >/dev/null | grep -v '^{'
      done
    done
  done
done
