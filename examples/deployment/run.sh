#!/usr/bin/env bash
# Run FedGKT on Flower's deployment engine: one SuperLink and N SuperNodes on
# 127.0.0.1, each node with its own partition, then `flwr run` against them.
#
#   bash examples/deployment/run.sh                 # insecure (plain HTTP)
#   bash examples/deployment/run.sh --tls           # TLS + SuperNode authentication
#   bash examples/deployment/run.sh --tls --show-unregistered
#                                                   # ... and show a node with an
#                                                   # unregistered key being refused
# Options: --nodes N (default 2), --work DIR (default: a new temporary folder),
#          --run-config "k=v ..." (run-config overrides; default
#          "num-server-rounds=2").
# Every process the script starts is stopped by its id when it ends.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
TLS=0
SHOW_UNREGISTERED=0
NODES=2
WORK=""
RUN_CONFIG=""

while [ $# -gt 0 ]; do
  case "$1" in
    --tls) TLS=1 ;;
    --show-unregistered) SHOW_UNREGISTERED=1 ;;
    --nodes) NODES="$2"; shift ;;
    --work) WORK="$2"; shift ;;
    --run-config) RUN_CONFIG="$2"; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
RUN_CONFIG=${RUN_CONFIG:-num-server-rounds=2}
if [ "$SHOW_UNREGISTERED" = 1 ] && [ "$TLS" = 0 ]; then
  echo "--show-unregistered needs --tls (authentication runs over TLS)" >&2; exit 2
fi

WORK=${WORK:-$(mktemp -d -t fedgkt-deployment.XXXXXX)}
mkdir -p "$WORK/logs" "$WORK/out"
export FLWR_HOME="$WORK/flwr-home"
export FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_DISABLE_UPDATE_CHECK=1
mkdir -p "$FLWR_HOME"

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true; done
  sleep 2
  for pid in "${PIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT INT TERM

# start NAME COMMAND...: run in its own session (so its children stop with it), log to logs/NAME.log
start() {
  local name="$1"; shift
  setsid "$@" >"$WORK/logs/$name.log" 2>&1 &
  PIDS+=("$!")
  echo "started $name (pid $!)"
}

PORT=$(free_port)
LINK="127.0.0.1:$PORT"
LINK_ARGS=(--insecure)
NODE_TLS_ARGS=(--insecure)
CONNECTION="insecure = true"

if [ "$TLS" = 1 ]; then
  CERTS="$WORK/certs"; mkdir -p "$CERTS"
  # A private CA, and a server certificate for 127.0.0.1 / localhost signed by it
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=fedgkt-test-ca" \
    -keyout "$CERTS/ca.key" -out "$CERTS/ca.crt" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" \
    -keyout "$CERTS/server.key" -out "$CERTS/server.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' > "$CERTS/san.ext"
  openssl x509 -req -in "$CERTS/server.csr" -CA "$CERTS/ca.crt" -CAkey "$CERTS/ca.key" \
    -CAcreateserial -days 2 -extfile "$CERTS/san.ext" -out "$CERTS/server.pem" 2>/dev/null
  LINK_ARGS=(--ssl-ca-certfile "$CERTS/ca.crt" --ssl-certfile "$CERTS/server.pem"
             --ssl-keyfile "$CERTS/server.key" --enable-supernode-auth)
  NODE_TLS_ARGS=(--root-certificates "$CERTS/ca.crt")
  CONNECTION="root-certificates = \"$CERTS/ca.crt\""
  # One EC key pair (P-384, OpenSSH format) per node; the extra one is never registered
  python3 - "$WORK/keys" "$NODES" <<'PY'
import sys
from pathlib import Path
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
folder, count = Path(sys.argv[1]), int(sys.argv[2])
folder.mkdir(parents=True, exist_ok=True)
for name in [f"node{i}" for i in range(count)] + ["unregistered"]:
    key = ec.generate_private_key(ec.SECP384R1())
    (folder / name).write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()))
    (folder / f"{name}.pub").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
PY
fi

# The CLI's connection to this SuperLink, in this run's private FLWR_HOME
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "deployment"

[superlink.deployment]
address = "$LINK"
$CONNECTION
TOML

start superlink flower-superlink "${LINK_ARGS[@]}" --host 127.0.0.1 --port "$PORT" \
  --database "$WORK/superlink.db" --disable-runtime-dependency-installation
for _ in $(seq 1 60); do
  if grep -q "Starting Flower SuperLink\|Flower Deployment Runtime" "$WORK/logs/superlink.log" 2>/dev/null \
     && python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', $PORT), 1)" 2>/dev/null; then
    break
  fi
  sleep 1
done

if [ "$TLS" = 1 ]; then
  for i in $(seq 0 $((NODES - 1))); do
    flwr supernode register "$WORK/keys/node$i.pub" deployment
  done
fi

for i in $(seq 0 $((NODES - 1))); do
  AUTH=()
  [ "$TLS" = 1 ] && AUTH=(--auth-supernode-private-key "$WORK/keys/node$i")
  start "supernode$i" flower-supernode "${NODE_TLS_ARGS[@]}" "${AUTH[@]}" --superlink "$LINK" \
    --port "$(free_port)" --node-config "partition-id=$i num-partitions=$NODES"
done

if [ "$SHOW_UNREGISTERED" = 1 ]; then
  start unregistered flower-supernode "${NODE_TLS_ARGS[@]}" \
    --auth-supernode-private-key "$WORK/keys/unregistered" --superlink "$LINK" \
    --port "$(free_port)" --node-config "partition-id=0 num-partitions=$NODES" --max-retries 0
fi

cd "$REPO"
flwr run . deployment --stream --federation-config "num-supernodes=$NODES" \
  --run-config "$RUN_CONFIG min-available-nodes=$NODES min-train-nodes=$NODES min-evaluate-nodes=$NODES output-dir='$WORK/out'"

echo "results: $WORK/out/results.json"
echo "logs:    $WORK/logs/"
if [ "$SHOW_UNREGISTERED" = 1 ]; then
  echo "--- the node with an unregistered key was refused (logs/unregistered.log):"
  grep -A 2 "ERROR" "$WORK/logs/unregistered.log" || tail -n 5 "$WORK/logs/unregistered.log"
fi
