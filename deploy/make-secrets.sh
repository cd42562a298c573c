#!/usr/bin/env bash
# Make the files that deploy/compose.yaml and deploy/k8s/ mount as secrets:
#   ca.crt ca.key          a private CA for this federation (keep ca.key off the servers)
#   tls.crt tls.key        the coordinator's certificate, signed by that CA
#   client-N.token         one random bearer token per client, N = 0 .. CLIENTS-1 (client side)
#   tokens.txt             every client's `client-N token` line: security.tokens_file (server side)
#
# Usage: deploy/make-secrets.sh OUT_DIR
#   CLIENTS=3                          how many client tokens
#   EXTRA_SANS="DNS:fl.example.org,IP:203.0.113.7"
#                                      names clients on other machines dial, added to the
#                                      certificate beside the compose and in-cluster names
#   DAYS=825                           validity of both certificates
#   FORCE=1                            overwrite files that exist (default: refuse)
#
# Compose:    deploy/make-secrets.sh deploy/secrets
# Kubernetes: deploy/make-secrets.sh deploy/k8s/secrets   (kustomize's secretGenerator reads it)
set -euo pipefail

out=${1:?usage: $0 OUT_DIR (see the header of this script)}
clients=${CLIENTS:-3}
days=${DAYS:-825}
sans="DNS:localhost,IP:127.0.0.1,DNS:server,DNS:fedkrso-server,DNS:fedkrso-server.fedkrso"
sans+=",DNS:fedkrso-server.fedkrso.svc,DNS:fedkrso-server.fedkrso.svc.cluster.local"
if [[ -n ${EXTRA_SANS:-} ]]; then
  sans+=",${EXTRA_SANS}"
fi

if ! [[ $clients =~ ^[1-9][0-9]*$ ]]; then
  echo "CLIENTS must be a positive integer, got '$clients'" >&2
  exit 2
fi

mkdir -p "$out"
if [[ -z ${FORCE:-} && -e $out/ca.key ]]; then
  echo "$out/ca.key exists; set FORCE=1 to replace the CA and every file signed by it" >&2
  exit 1
fi

umask 077
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)

openssl req -x509 "${ec[@]}" -days "$days" -subj "/CN=fedkrso-ca" \
  -keyout "$out/ca.key" -out "$out/ca.crt" \
  -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null

openssl req -new "${ec[@]}" -subj "/CN=fedkrso-server" \
  -keyout "$out/tls.key" -out "$work/server.csr" 2>/dev/null

cat >"$work/server.ext" <<EOF
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=$sans
EOF

openssl x509 -req -in "$work/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" \
  -set_serial "0x$(openssl rand -hex 16)" -days "$days" \
  -extfile "$work/server.ext" -out "$out/tls.crt" 2>/dev/null

echo "# client_id token (fedkrso-server security.tokens_file); delete a line to revoke" >"$out/tokens.txt"
for ((i = 0; i < clients; i++)); do
  token=$(openssl rand -hex 32)
  printf '%s' "$token" >"$out/client-$i.token"
  printf 'client-%d %s\n' "$i" "$token" >>"$out/tokens.txt"
done

echo "wrote $out: ca.crt ca.key tls.crt tls.key tokens.txt client-{0..$((clients - 1))}.token"
echo "certificate names: $sans"
