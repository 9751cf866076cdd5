#!/usr/bin/env bash
# Download the jars for a local Apache Kafka 3.9.1 broker (KRaft) from Maven
# Central into a git-ignored cache, so tests and demos can run a real broker
# without docker or a Kafka tarball.
#
# Usage: deploy/kafka/fetch-kafka.sh
# Env:   STREAM_DETECTOR_KAFKA_HOME  cache dir (default <repo>/.cache/kafka-3.9.1)
#        MVN                         maven executable (default: mvn)
# Prints the kafka home directory on stdout. Idempotent: a marker file written
# after a complete copy makes later runs a no-op.
set -euo pipefail

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "$script_dir/../.." && pwd)"
pom="$script_dir/pom.xml"
kafka_home="${STREAM_DETECTOR_KAFKA_HOME:-$repo_root/.cache/kafka-3.9.1}"
libs="$kafka_home/libs"
marker="$kafka_home/.libs-complete"
mvn_bin="${MVN:-mvn}"

# The marker records the pom's checksum so editing the pom triggers a refetch.
pom_sum="$(sha256sum "$pom" | cut -d' ' -f1)"
mkdir -p "$kafka_home"
# Always refresh the (tiny) log4j config so edits to it apply without a refetch.
cp "$script_dir/log4j.properties" "$kafka_home/log4j.properties"
if [[ -f "$marker" && "$(cat "$marker")" == "$pom_sum" ]] && compgen -G "$libs/kafka_2.13-*.jar" >/dev/null; then
    echo "$kafka_home"
    exit 0
fi

if ! command -v "$mvn_bin" >/dev/null 2>&1; then
    echo "fetch-kafka.sh: '$mvn_bin' not found; install Maven (and Java 17+)" >&2
    exit 1
fi

# Copy into a temp dir first and swap it in, so an interrupted run never leaves
# a half-filled libs dir behind.
tmp_libs="$(mktemp -d "$kafka_home/libs.tmp.XXXXXX")"
trap 'rm -rf "$tmp_libs"' EXIT
echo "fetch-kafka.sh: resolving Kafka jars into $libs ..." >&2
"$mvn_bin" -q -B -f "$pom" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$tmp_libs" >&2
rm -rf "$libs"
mv "$tmp_libs" "$libs"
trap - EXIT
echo "$pom_sum" > "$marker"
echo "$kafka_home"
