#!/usr/bin/env bash
# Makes the certificates of a gpuorch cluster with openssl: a CA, the coordinator's
# server certificate, one client certificate per node, and optionally people's.
#
#   scripts/make-certs.sh DIR COORDINATOR_NAMES [NODE_ID...] [user:NAME...]
#   scripts/make-certs.sh /tmp/gpuorch-tls coordinator.example.internal,10.0.0.5 gpu-node-01 gpu-node-02
#
# COORDINATOR_NAMES: comma-separated DNS names and IP addresses that clients and agents
# use to reach the coordinator (each becomes a subjectAltName). A node's certificate names
# it as the URI spiffe://gpuorch/node/<id>: only that makes a certificate a node's (a DNS
# name does not, so a person's certificate from the same CA cannot register as a node).
# user:NAME makes DIR/users/NAME.crt, a person's, with no node URI. An existing DIR/ca.key
# is reused, so run it again with new node ids to add nodes. Keys are written 0600.
# An organisation with its own PKI issues the same certificates there instead: the
# coordinator's needs serverAuth, a node's needs clientAuth and the URI SAN above.
set -euo pipefail

if [[ $# -lt 2 ]]; then
    sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
dir=$1
coordinator_names=$2
shift 2
days=${GPUORCH_CERT_DAYS:-825}
mkdir -p "$dir/nodes" "$dir/users"
umask 077

if [[ ! -f "$dir/ca.key" ]]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
        -subj "/CN=gpuorch cluster CA" -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
    chmod 0644 "$dir/ca.crt"
    echo "made $dir/ca.crt (keep $dir/ca.key offline once the certificates are made)"
fi

# issue NAME SUBJECT_ALT_NAMES EXTENDED_KEY_USAGE OUT_PREFIX
issue() {
    local name=$1 alt_names=$2 usage=$3 out=$4 extensions
    extensions=$(mktemp)
    printf 'subjectAltName=%s\nextendedKeyUsage=%s\nkeyUsage=critical,digitalSignature\nbasicConstraints=CA:FALSE\n' \
        "$alt_names" "$usage" >"$extensions"
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$name" \
        -keyout "$out.key" -out "$out.csr" 2>/dev/null
    openssl x509 -req -in "$out.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
        -days "$days" -extfile "$extensions" -out "$out.crt" 2>/dev/null
    rm -f "$out.csr" "$extensions"
    chmod 0644 "$out.crt"
    echo "made $out.crt ($alt_names)"
}

alt_names=""
for name in ${coordinator_names//,/ }; do
    if [[ $name =~ ^[0-9.]+$ || $name == *:* ]]; then entry="IP:$name"; else entry="DNS:$name"; fi
    alt_names=${alt_names:+$alt_names,}$entry
done
issue "${coordinator_names%%,*}" "$alt_names" serverAuth "$dir/coordinator"

for name in "$@"; do
    if [[ $name == user:* ]]; then
        user=${name#user:}
        issue "$user" "URI:spiffe://gpuorch/user/$user" clientAuth "$dir/users/$user"
    else
        issue "$name" "DNS:$name,URI:spiffe://gpuorch/node/$name" clientAuth "$dir/nodes/$name"
    fi
done
