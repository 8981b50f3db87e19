#!/bin/sh
# Writes a random internal token and API key, one file each, into DIR (created if missing):
#   deploy/make-secrets.sh deploy/secrets               # for docker-compose
#   deploy/make-secrets.sh deploy/k8s/base/secrets      # for kustomize's secretGenerator
# Files that exist are kept, so running it again never rotates a secret by surprise. Both
# folders are git-ignored: the secrets never reach the repository.
set -eu
dir="${1:?usage: $0 DIR (deploy/secrets for compose, deploy/k8s/base/secrets for Kubernetes)}"
umask 077
mkdir -p "$dir"
for name in internal_token api_key; do
    file="$dir/$name"
    if [ -s "$file" ]; then
        echo "keeping $file"
        continue
    fi
    # 43 characters from [A-Za-z0-9]: about 256 bits, as secrets.token_urlsafe(32).
    LC_ALL=C tr -dc 'A-Za-z0-9' < /dev/urandom | head -c 43 > "$file"
    # The folder stays private (0700); the file must be readable by the containers' uid 10001,
    # which sees it through a bind mount with the host's permissions.
    chmod 0644 "$file"
    echo "wrote $file"
done
