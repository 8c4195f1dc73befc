#!/usr/bin/env bash
# Development PKI for TLS 1.3 / mTLS: a CA, a server certificate (localhost, 127.0.0.1, ::1) and
# client certificates whose OU carries the role (viewer|operator|developer|admin).
#   bash scripts/make_dev_certs.sh [OUT_DIR] [CLIENT_CN:ROLE ...]
# Default OUT_DIR build/certs; default clients: dev-admin:admin dev-developer:developer.
# Re-running keeps the CA and re-issues the leaf certificates (a rotation: a running server
# picks the new files up within tls.reload_interval_s). Keys are P-256, mode 0600. NOT for production.
set -euo pipefail
OUT=${1:-build/certs}
shift || true
CLIENTS=("$@")
[ ${#CLIENTS[@]} -eq 0 ] && CLIENTS=(dev-admin:admin dev-developer:developer)
DAYS=${DAYS:-30}
mkdir -p "$OUT"
chmod 700 "$OUT"
umask 077
cd "$OUT"

if [ ! -f ca.key ] || [ ! -f ca.crt ]; then
  openssl ecparam -name prime256v1 -genkey -noout -out ca.key
  openssl req -x509 -new -key ca.key -sha256 -days 365 -subj "/O=akidb dev/CN=akidb dev CA" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" -out ca.crt
fi

issue() {  # name subject extfile
  local name=$1 subj=$2 ext=$3
  openssl ecparam -name prime256v1 -genkey -noout -out "$name.key.new"
  openssl req -new -key "$name.key.new" -subj "$subj" -out "$name.csr"
  openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -sha256 \
    -days "$DAYS" -extfile "$ext" -out "$name.crt.new" 2>/dev/null
  rm -f "$name.csr"
  # key first, then cert: the server refuses a mismatched pair and keeps the old one meanwhile
  mv -f "$name.key.new" "$name.key"
  mv -f "$name.crt.new" "$name.crt"
}

cat > server.ext <<'X'
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1
X
issue server "/O=akidb dev/CN=localhost" server.ext

cat > client.ext <<'X'
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth
X
for spec in "${CLIENTS[@]}"; do
  cn=${spec%%:*}; role=${spec#*:}
  case "$role" in viewer|operator|developer|admin) ;; *) echo "bad role $role" >&2; exit 2;; esac
  issue "client-$cn" "/O=akidb dev/OU=$role/CN=$cn" client.ext
done
rm -f server.ext client.ext ca.srl
echo "dev certificates in $(pwd): ca.crt server.{crt,key} $(printf 'client-%s.{crt,key} ' "${CLIENTS[@]%%:*}")" >&2
