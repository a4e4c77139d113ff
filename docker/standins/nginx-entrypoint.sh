#!/bin/sh
# What the official nginx image does at start: every /etc/nginx/templates/*.template becomes
# /etc/nginx/conf.d/*.conf with the container's environment variables (and only those) filled in.
set -eu
for template in /etc/nginx/templates/*.template; do
    [ -e "$template" ] || continue
    defined="$(env | sed -n 's/^\([A-Za-z_][A-Za-z0-9_]*\)=.*/${\1}/p' | tr '\n' ' ')"
    name="$(basename "$template" .template)"
    envsubst "$defined" <"$template" >"/etc/nginx/conf.d/$name"
done
exec "$@"
