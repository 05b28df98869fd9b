# Sourced by up.sh when CACHESYNC_STACK_EXTRAS names "secure": a KRaft broker of its own
# (node 11, $STACK/kafka-secure) that speaks only TLS, with
#   - SASL_SSL on KAFKA_SECURE_PORT: PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512, the SCRAM
#     users created when its storage is formatted (kafka-storage format --add-scram);
#   - SSL on KAFKA_SECURE_MTLS_PORT, which requires a client certificate.
# Its certificates come from a CA this script makes with openssl (IP SAN 127.0.0.1),
# passwords from openssl rand; both are made once and kept in $STACK/kafka-secure/.
# It writes the client settings, in cachesync's own variables, to
#   $STACK/kafka-secure/sasl_ssl.env  (SCRAM-SHA-512 login as "cachesync")
#   $STACK/kafka-secure/mtls.env      (SSL with the client certificate)
# so that `set -a; . .stack/kafka-secure/sasl_ssl.env; set +a` points cachesync at it.

secure_certs() { # secure_certs DIR: a CA, a broker certificate and a client certificate
  local d=$1
  [[ -f "$d/ca.pem" && -f "$d/broker.pem" && -f "$d/client.key" ]] && return
  command -v openssl >/dev/null || die "openssl not found: it makes the secure broker's certificates"
  log "making a local CA and certificates in $d"
  (
    cd "$d" && umask 077
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=cachesync local CA" \
      -keyout ca.key -out ca.pem
    for who in broker client; do
      openssl req -newkey rsa:2048 -nodes -subj "/CN=cachesync-$who" -keyout "$who.key" -out "$who.csr"
      printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n' > "$who.ext"
      openssl x509 -req -in "$who.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 3650 \
        -extfile "$who.ext" -out "$who.crt"
      rm -f "$who.csr" "$who.ext"
    done
    # A PEM key store is the private key (PKCS#8, unencrypted) followed by its chain.
    cat broker.key broker.crt ca.pem > broker.pem
  ) >>"$STACK/log/kafka-secure.log" 2>&1 || die "openssl could not make the certificates (see $STACK/log/kafka-secure.log)"
}

secure_secret() { # secure_secret FILE: a password made once and kept in FILE
  [[ -s "$1" ]] || (umask 077 && openssl rand -hex 16 > "$1")
  cat "$1"
}

start_secure_kafka() {
  local dir="$STACK/kafka-secure"
  mkdir -p "$dir"
  secure_certs "$dir"
  local user_pw broker_pw
  user_pw=$(secure_secret "$dir/cachesync.password")
  broker_pw=$(secure_secret "$dir/broker.password")
  local listeners
  listeners=$(cat <<PROPS
listeners=SASL_SSL://127.0.0.1:$KAFKA_SECURE_PORT,MTLS://127.0.0.1:$KAFKA_SECURE_MTLS_PORT,CONTROLLER://127.0.0.1:$KAFKA_SECURE_CONTROLLER_PORT
advertised.listeners=SASL_SSL://127.0.0.1:$KAFKA_SECURE_PORT,MTLS://127.0.0.1:$KAFKA_SECURE_MTLS_PORT
listener.security.protocol.map=SASL_SSL:SASL_SSL,MTLS:SSL,CONTROLLER:PLAINTEXT
inter.broker.listener.name=SASL_SSL
sasl.enabled.mechanisms=PLAIN,SCRAM-SHA-256,SCRAM-SHA-512
sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="broker" password="$broker_pw";
listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required username="broker" password="$broker_pw" user_broker="$broker_pw" user_cachesync="$user_pw";
listener.name.mtls.ssl.client.auth=required
ssl.keystore.type=PEM
ssl.keystore.location=$dir/broker.pem
ssl.truststore.type=PEM
ssl.truststore.location=$dir/ca.pem
PROPS
)
  KAFKA_NODE_CAFILE="$dir/ca.pem" start_kafka_node kafka-secure 11 \
    "$KAFKA_SECURE_PORT" "$KAFKA_SECURE_CONTROLLER_PORT" "$KAFKA_EXTRA_HEAP_MB" "$listeners" \
    --add-scram "SCRAM-SHA-512=[name=broker,password=$broker_pw]" \
    --add-scram "SCRAM-SHA-512=[name=cachesync,password=$user_pw]" \
    --add-scram "SCRAM-SHA-256=[name=cachesync,password=$user_pw]"
  (
    umask 077
    cat > "$dir/sasl_ssl.env" <<ENV
KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:$KAFKA_SECURE_PORT
KAFKA_SECURITY_PROTOCOL=SASL_SSL
KAFKA_SASL_MECHANISM=SCRAM-SHA-512
KAFKA_SASL_USERNAME=cachesync
KAFKA_SASL_PASSWORD=$user_pw
KAFKA_SSL_CAFILE=$dir/ca.pem
ENV
    cat > "$dir/mtls.env" <<ENV
KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:$KAFKA_SECURE_MTLS_PORT
KAFKA_SECURITY_PROTOCOL=SSL
KAFKA_SSL_CAFILE=$dir/ca.pem
KAFKA_SSL_CERTFILE=$dir/client.crt
KAFKA_SSL_KEYFILE=$dir/client.key
ENV
  )
  log "secure kafka: SASL_SSL on :$KAFKA_SECURE_PORT, SSL with client certificates on :$KAFKA_SECURE_MTLS_PORT ($dir/*.env)"
}

if extra_enabled secure; then start_secure_kafka; fi
