#!/bin/sh
# docker-compose.yml mounts this into /docker-entrypoint-initdb.d/: the image's
# pg_hba.conf lets any host in (trust) for normal connections only, but the WAL
# relay also opens a replication connection from its container.
set -eu
echo "host replication all all trust" >>"$PGDATA/pg_hba.conf"
