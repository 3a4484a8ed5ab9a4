"""A real single-node Apache Kafka broker (KRaft, broker+controller), run natively.

The broker's classpath is fetched from Maven Central with Maven into a cache outside the
clone (`settings.kafka.jars_dir`), the KRaft log directory is formatted once, and the JVM is
started directly (`kafka.Kafka`). Readiness is a metadata request that succeeds, not a sleep.

`recsys kafka start|stop|status` drives it; tests use `LocalBroker` on free ports.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from recsys.settings import KafkaSettings, get_settings

__all__ = ["BrokerError", "LocalBroker", "ensure_jars", "free_port", "main", "wait_until_ready"]


class BrokerError(RuntimeError):
    """The local broker could not be fetched, formatted, started or stopped."""


_POM = """<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>recsys.local</groupId>
  <artifactId>kafka-broker-classpath</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_{scala}</artifactId>
      <version>{version}</version>
    </dependency>
    <!-- the broker logs through slf4j 1.7 (its own dependency); without a binding it logs nothing -->
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>2.24.3</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-core</artifactId>
      <version>2.24.3</version>
    </dependency>
  </dependencies>
</project>
"""

_LOG4J2 = """status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = {log_file}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = {level}
rootLogger.appenderRef.file.ref = file
logger.kafka.name = kafka
logger.kafka.level = {level}
logger.apache.name = org.apache
logger.apache.level = {level}
"""

_SERVER_PROPERTIES = """process.roles=broker,controller
node.id=1
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
controller.quorum.voters=1@127.0.0.1:{controller_port}
log.dirs={log_dir}
num.partitions={partitions}
auto.create.topics.enable=true
# single node: every internal topic has exactly one replica
offsets.topic.replication.factor=1
offsets.topic.num.partitions={partitions}
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
default.replication.factor=1
min.insync.replicas=1
# consumers join immediately: tests and the demo start groups often
group.initial.rebalance.delay.ms=0
# keep a shared dev machine's disk small
log.retention.hours=168
log.segment.bytes=67108864
log.cleaner.dedupe.buffer.size=8388608
"""


def _require(tool: str, purpose: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise BrokerError(f"`{tool}` is not on PATH; it is needed to {purpose}. Install it (Kafka 4 needs Java 17+).")
    return path


def _check_java() -> str:
    java = _require("java", "run the Kafka broker")
    out = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
    # first line looks like: openjdk version "17.0.15" 2025-04-15
    try:
        major = int(out.split('"')[1].split(".")[0])
    except (IndexError, ValueError):
        raise BrokerError(f"could not read the Java version from: {out.strip()!r}") from None
    if major < 17:
        raise BrokerError(f"Kafka 4 needs Java 17 or later; `java` is version {major}")
    return java


def ensure_jars(cfg: KafkaSettings) -> Path:
    """Fetch the broker's runtime classpath into the cache once; return the lib directory."""
    home = cfg.jars_dir / f"kafka_{cfg.scala_version}-{cfg.version}"
    lib = home / "lib"
    marker = home / ".complete"
    if marker.exists():
        return lib
    mvn = _require("mvn", "fetch the Kafka broker jars from Maven Central")
    home.mkdir(parents=True, exist_ok=True)
    (home / "pom.xml").write_text(_POM.format(scala=cfg.scala_version, version=cfg.version))
    tmp_lib = home / "lib.partial"
    shutil.rmtree(tmp_lib, ignore_errors=True)
    print(f"fetching Kafka {cfg.version} from Maven Central into {home} ...", file=sys.stderr)
    proc = subprocess.run(
        [mvn, "-q", "-B", "--strict-checksums", "-f", str(home / "pom.xml"), "dependency:copy-dependencies",
         "-DincludeScope=runtime", f"-DoutputDirectory={tmp_lib}"],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise BrokerError(f"mvn could not fetch Kafka {cfg.version}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    shutil.rmtree(lib, ignore_errors=True)
    tmp_lib.rename(lib)
    marker.write_text(cfg.version)
    return lib


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_free(port: int) -> bool:
    """Whether a listener could bind ``port`` now. SO_REUSEADDR as the JVM sets it: a socket of
    a stopped broker still in TIME_WAIT does not count, a live listener does."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_until_ready(bootstrap: str, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Block until a metadata request to the broker succeeds (or fail with the reason)."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BrokerError(f"the broker exited with code {proc.returncode} while starting")
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000)
            try:
                admin.describe_cluster()
                return
            finally:
                admin.close()
        except (KafkaError, OSError, ValueError) as exc:
            last = exc
            time.sleep(0.3)
    raise BrokerError(f"the broker at {bootstrap} did not answer a metadata request within {timeout_s:.0f}s: {last}")


class LocalBroker:
    """One broker+controller process whose state lives in `data_dir`."""

    def __init__(self, cfg: KafkaSettings, *, log_level: str = "WARN") -> None:
        self.cfg = cfg
        self.data_dir = Path(cfg.data_dir).resolve()
        self.log_level = log_level

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.cfg.port}"

    @property
    def _pid_file(self) -> Path:
        return self.data_dir / "broker.pid"

    def pid(self) -> int | None:
        """The running broker's pid, or None (stale pid files are ignored)."""
        try:
            pid = int(self._pid_file.read_text())
        except (FileNotFoundError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):  # gone, or the pid now belongs to another user
            return None
        try:
            if b"kafka.Kafka" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                return None
        except OSError:  # gone since the kill(0), or no /proc here (the pid file is all there is)
            return None if Path("/proc/self").exists() else pid
        return pid

    def _running_port(self) -> int | None:
        """The client port in the server.properties the running broker was started with."""
        props = self.data_dir / "server.properties"
        if not props.exists():
            return None
        for line in props.read_text().splitlines():
            if line.startswith("listeners=") and "PLAINTEXT://" in line:
                return int(line.split("PLAINTEXT://", 1)[1].split(",", 1)[0].rsplit(":", 1)[1])
        return None

    def _write_config(self) -> Path:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        props = self.data_dir / "server.properties"
        props.write_text(_SERVER_PROPERTIES.format(
            port=self.cfg.port, controller_port=self.cfg.controller_port,
            log_dir=self.data_dir / "log", partitions=self.cfg.partitions,
        ))
        (self.data_dir / "log4j2.properties").write_text(
            _LOG4J2.format(log_file=self.data_dir / "broker.log", level=self.log_level))
        return props

    def _java_cmd(self, lib: Path, main_class: str, *args: str) -> list[str]:
        return [
            _check_java(), *self.cfg.heap.split(), "-XX:+UseG1GC", "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.data_dir / 'log4j2.properties'}",
            "-cp", f"{lib}/*", main_class, *args,
        ]

    def start(self) -> str:
        """Start the broker if it is not running; return its bootstrap address."""
        if (pid := self.pid()) is not None:
            running = self._running_port()
            if running not in (None, self.cfg.port):
                # Waiting on the new port would time out with a misleading "did not answer".
                raise BrokerError(f"the broker of {self.data_dir} (pid {pid}) is still running, on port {running}, "
                                  f"not {self.cfg.port}: stop it first (`recsys kafka stop` with its settings, or "
                                  f"kill {pid})")
            wait_until_ready(self.bootstrap, self.cfg.start_timeout_s)
            return self.bootstrap
        # Readiness is "something answers on the port": a port held by another broker (another
        # data dir) would pass it while this JVM dies of address-in-use.
        for port in (self.cfg.port, self.cfg.controller_port):
            if not _port_free(port):
                raise BrokerError(f"port {port} is in use by another process; pick another "
                                  f"(RECSYS_KAFKA__PORT / RECSYS_KAFKA__CONTROLLER_PORT; the clients follow "
                                  f"RECSYS_KAFKA__PORT unless RECSYS_KAFKA__BOOTSTRAP_SERVERS is set) or stop it")
        lib = ensure_jars(self.cfg)
        props = self._write_config()
        log_dir = self.data_dir / "log"
        if not (log_dir / "meta.properties").exists():
            cluster_id = _kafka_cluster_id()
            proc = subprocess.run(
                self._java_cmd(lib, "kafka.tools.StorageTool", "format", f"--cluster-id={cluster_id}", "-c", str(props)),
                capture_output=True, text=True,
            )
            if proc.returncode != 0:
                raise BrokerError(f"formatting {log_dir} failed:\n{proc.stdout}{proc.stderr}")
        with open(self.data_dir / "broker.out", "ab") as out:
            proc = subprocess.Popen(self._java_cmd(lib, "kafka.Kafka", str(props)), stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self._pid_file.write_text(str(proc.pid))
        try:
            wait_until_ready(self.bootstrap, self.cfg.start_timeout_s, proc)
        except BrokerError as exc:
            self.stop()
            tail = (self.data_dir / "broker.log").read_text()[-2000:] if (self.data_dir / "broker.log").exists() else ""
            raise BrokerError(f"{exc}\n--- broker.log (tail) ---\n{tail}") from None
        return self.bootstrap

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Stop the broker cleanly (SIGTERM, then SIGKILL after the timeout); True if it ran."""
        pid = self.pid()
        if pid is None:
            self._pid_file.unlink(missing_ok=True)
            return False
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:  # exited since pid() looked
            pass
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not _alive(pid):
                break
            time.sleep(0.2)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            # Gone before the pid file: a start or destroy right after would race a JVM still
            # holding the ports and the log directory.
            deadline = time.monotonic() + timeout_s
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
        self._pid_file.unlink(missing_ok=True)
        return True

    def destroy(self) -> None:
        """Stop and delete every byte of broker state; a BrokerError, deleting nothing, for a
        directory that holds anything but a broker's state (data_dir is relative to the working
        directory: from / the default would name /var/kafka)."""
        if self.data_dir.is_dir() and any(self.data_dir.iterdir()) and not any(
                (self.data_dir / name).exists() for name in ("server.properties", "broker.pid", "log/meta.properties")):
            raise BrokerError(f"{self.data_dir} does not hold a local broker's state (no server.properties, broker.pid "
                              f"or log/meta.properties): not deleting it; check RECSYS_KAFKA__DATA_DIR and the working directory")
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        # reap it if it is our child, so it does not linger as a zombie
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:  # gone since the kill(0), or no /proc here
        return not Path("/proc/self").exists()


def _kafka_cluster_id() -> str:
    # Kafka cluster ids are 16 random bytes, url-safe base64 without padding; one may start
    # with "-", which is why it is passed as --cluster-id=<id>, never as a separate argument.
    import base64

    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="recsys kafka", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["start", "stop", "status", "fetch", "destroy"])
    args = parser.parse_args(argv)
    broker = LocalBroker(get_settings().kafka)
    try:
        if args.action == "fetch":
            print(ensure_jars(broker.cfg))
        elif args.action == "start":
            print(f"kafka ready at {broker.start()} (data in {broker.data_dir})")
        elif args.action == "stop":
            print("kafka stopped" if broker.stop() else "kafka was not running")
        elif args.action == "destroy":
            broker.destroy()
            print(f"kafka stopped and {broker.data_dir} removed")
        else:
            pid = broker.pid()
            # The port it was started on, which the settings of this shell may not say.
            port = broker._running_port() or broker.cfg.port
            print(f"kafka running (pid {pid}) at 127.0.0.1:{port}" if pid else "kafka not running")
            return 0 if pid else 1
    except BrokerError as exc:
        print(f"recsys kafka {args.action}: {exc}", file=sys.stderr)
        return 1
    return 0
