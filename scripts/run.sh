#!/usr/bin/env bash
# `make run`: start the DPAL ML backend on port 9090 with the embedded training queue.
# Every setting comes from the environment (see README "Settings"); sensible defaults apply.
set -euo pipefail
cd "$(dirname "$0")/.."
export MODEL_DIR="${MODEL_DIR:-$PWD/.dpal/models}"
PORT="${PORT:-9090}"
cat <<MSG
DPAL backend starting on http://0.0.0.0:${PORT}
  backbone:       ${DPAL_MODEL:-openai/clip-vit-base-patch16} (downloaded once from Hugging Face; set
                  DPAL_MODEL to a local folder on offline machines)
  Label Studio:   ${LABEL_STUDIO_URL:-http://localhost:8080} (set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY)
  training queue: ${REDIS_URL:-embedded (no REDIS_URL): retrains run inside this process}
Connect it in Label Studio: Project -> Settings -> Model -> Connect Model -> URL http://<this host>:${PORT}
Then in the Data Manager sort by "Prediction score" ascending and use "Label Tasks As Displayed":
the least certain images come first. Stop with Ctrl-C.
MSG
exec .venv/bin/dpal serve --host 0.0.0.0 --port "$PORT"
