# Shell helpers shared by `scripts/up` (the quick start) and `.ci/run` (the tests): wait for a
# local port, and start a local RabbitMQ, installing it first when it is missing. Sourced, not run.

# Whether something listens on 127.0.0.1:$1.
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Waits up to $3 seconds for $2 to listen on 127.0.0.1:$1; says so and fails otherwise.
wait_port() { # port name seconds
  for _ in $(seq 1 "$(( $3 * 5 ))"); do port_open "$1" && return 0; sleep 0.2; done
  echo "error: $2 is not listening on 127.0.0.1:$1" >&2
  return 1
}

# Installs Debian's package $1 (apt-get, as root), or says what to run and fails.
install_package() { # package why
  if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
    echo "error: $2 needs the package $1: install it (for example \`sudo apt-get install $1\`)" >&2
    return 1
  fi
  echo "installing $1 ($2)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$1" >/dev/null
}

# Starts RabbitMQ on 127.0.0.1:$1 unless something listens there, installing it when missing.
# The node's name, config and folders are RabbitMQ's own defaults, or its RABBITMQ_* variables.
ensure_rabbitmq() { # port
  port_open "$1" && return 0
  command -v rabbitmq-server >/dev/null || install_package rabbitmq-server "the broker" || return 1
  echo "starting RabbitMQ on 127.0.0.1:$1"
  if [[ $1 != 5672 ]]; then export RABBITMQ_NODE_PORT="$1"; fi
  rabbitmq-server -detached
  wait_port "$1" RabbitMQ 90
}
