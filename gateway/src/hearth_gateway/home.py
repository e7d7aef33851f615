"""The gateway's connection to the home's own MQTT broker (Home Assistant's Mosquitto,
zigbee2mqtt's, Tasmota's): where the home's sensors and lights already talk, in MQTT 3.1.1 as
often as 5 (docs/home.md).

Tasks name that broker's topics with the ``home:`` prefix (policy.HOME_PREFIX): the daemon
routes a task's subscriptions and publishes with that prefix here, and messages from here to
the tasks with it. The owner's policy (``tasks.home_read``, ``tasks.home_publish``) bounds what
a task may be granted there; tasks.py checks the grants as for local topics.

At least once, as on the gateway's own broker (link.py): the session is persistent
(``clean_session=False`` in 3.1.1, ``clean_start=False`` with a session expiry in 5), the task
subscriptions are QoS 1, and a message is acknowledged (PUBACK) only after the handler
returned, by which time tasks.py has committed it to the task inbox. So a message the broker
delivered is either in the inbox or delivered again, across a restart of either side. Retained
messages are never task events: a reconnect must not replay a sensor's last state as new
motion (3.1.1 cannot ask the broker not to send them, so those are dropped here by their flag).

The connection is made in the background: a non-blocking TCP probe first, as upstream_link.py
does, so a home broker that is unreachable never stalls the loop that serves the LAN. A broker
that refuses our credentials is said once in the log and retried slowly.

The gateway's Last Will there is ``hearth/<gateway id>/availability`` = ``offline`` (retained):
Home Assistant's availability for every entity ha.py announces.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.subscribeoptions import SubscribeOptions

from hearth.transport import BrokerAddress, properties, set_nodelay
from hearth_gateway._paho_io import LoopDriven
from hearth_gateway.config import Config
from hearth_gateway.errors import ConfigError
from hearth_gateway.loop import Loop, Timer

__all__ = ["HomeLink", "HomeTarget", "availability_topic", "home_topic_root"]

log = logging.getLogger(__name__)

CREDENTIAL_NAME = "home-broker-password"  # systemd LoadCredential= name
_KEEPALIVE_S = 15
_PROBE_TIMEOUT_S = 3.0
_RECONNECT_MAX_S = 30.0
_REFUSED_RETRY_S = 60.0  # a broker refusing our credentials: asked again this often
_SESSION_EXPIRY_S = 7 * 24 * 3600  # MQTT 5: events queue for a gateway down this long
_MAX_QUEUED = 10_000  # publishes held while disconnected; more are dropped and counted

# (topic, payload, retained) of every message from the home broker
Handler = Callable[[str, bytes, bool], None]


def home_topic_root(gateway_id: str) -> str:
    """The gateway's own topics on the home broker: status mirror, availability, commands."""
    return f"hearth/{gateway_id}"


def availability_topic(gateway_id: str) -> str:
    return f"{home_topic_root(gateway_id)}/availability"


def _password(config: Config) -> str | None:
    """From home_broker_password_file, else systemd's credential, else none."""
    path: Path | None = None
    if config.home_broker_password_file:
        path = Path(config.home_broker_password_file)
    elif os.environ.get("CREDENTIALS_DIRECTORY"):
        candidate = Path(os.environ["CREDENTIALS_DIRECTORY"]) / CREDENTIAL_NAME
        path = candidate if candidate.exists() else None
    if path is None:
        return None
    try:
        # One line; a trailing newline from `echo secret > file` is not part of it.
        return path.read_text().rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"home broker password: {exc}") from None


@dataclass(frozen=True, slots=True)
class HomeTarget:
    """Where the home broker is and how we log in (from the config's home_broker_* keys)."""

    address: BrokerAddress
    tls: bool
    protocol: str  # "3.1.1" or "5"
    client_id: str
    username: str = ""
    password: str | None = None
    ca_file: str = ""

    @classmethod
    def from_config(cls, config: Config, gateway_id: str) -> HomeTarget | None:
        url = config.home_broker.strip()
        if not url:
            if config.home_assistant:
                raise ConfigError("home_assistant = true needs a home_broker")
            return None
        tls = url.startswith("mqtts://")
        try:
            address = BrokerAddress.parse(
                url.removeprefix("mqtts://"), default_port=8883 if tls else 1883
            )
        except ValueError as exc:
            raise ConfigError(f"home_broker: {exc}") from None
        if config.home_broker_ca and not tls:
            raise ConfigError("home_broker_ca given for a plain mqtt:// home broker")
        return cls(
            address=address,
            tls=tls,
            protocol=config.home_broker_protocol,
            client_id=(config.home_broker_client_id or f"hearth-{gateway_id}")[:64],
            username=config.home_broker_username,
            password=_password(config),
            ca_file=config.home_broker_ca,
        )

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.address} (MQTT {self.protocol})"


class HomeLink(LoopDriven):
    """One paho client on the daemon's loop. ``state`` says where it stands, for status and
    Home Assistant; ``close()`` is idempotent."""

    def __init__(
        self,
        loop: Loop,
        target: HomeTarget,
        gateway_id: str,
        *,
        on_message: Handler,
        on_connected: Callable[[], None] = lambda: None,
    ) -> None:
        self.loop = loop
        self.target = target
        self._on_message = on_message
        self._on_connected = on_connected
        self._v5 = target.protocol == "5"
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=target.client_id,
            protocol=mqtt.MQTTv5 if self._v5 else mqtt.MQTTv311,
            # 3.1.1: the persistent session is asked for here; 5: in connect() below.
            clean_session=None if self._v5 else False,
        )
        self._client.on_socket_open = set_nodelay
        self._client.max_inflight_messages_set(64)
        self._client.max_queued_messages_set(_MAX_QUEUED)
        if target.tls:
            self._client.tls_set(ca_certs=target.ca_file or None)
        if target.username:
            self._client.username_pw_set(target.username, target.password)
        self._availability = availability_topic(gateway_id)
        self._client.will_set(self._availability, b"offline", qos=1, retain=True)
        self._client.manual_ack_set(True)  # after the handler (the inbox's commit)
        self._client.on_connect = self._connected
        self._client.on_disconnect = self._disconnected
        self._client.on_message = self._message
        self._filters: dict[str, bool] = {}  # filter -> retained messages wanted (ha.py's)
        self._probe_sock: socket.socket | None = None
        self._probe_timer: Timer | None = None
        self._retry_timer: Timer | None = None
        self._backoff_s = 0.5
        self._refused_said = False
        self._closed = False
        self.connected = False
        self.state = "connecting"
        self.received = 0
        self.dropped_publishes = 0  # not queued: disconnected for too long

    # -- subscriptions and publishing ----------------------------------------------------------

    def subscribe(self, topic_filter: str, on: bool, *, retained: bool = False) -> None:
        """QoS 1 and kept across reconnects. ``retained``: the broker's retained messages on
        the filter are wanted (ha.py's clean-up); task triggers never want them."""
        if on:
            self._filters[topic_filter] = retained
            if self.connected:
                self._subscribe_one(topic_filter, retained)
        else:
            self._filters.pop(topic_filter, None)
            if self.connected:
                self._client.unsubscribe(topic_filter)
        self._flush()

    def _subscribe_one(self, topic_filter: str, retained: bool) -> None:
        if self._v5:
            handling = (
                SubscribeOptions.RETAIN_SEND_ON_SUBSCRIBE
                if retained
                else SubscribeOptions.RETAIN_DO_NOT_SEND
            )
            options = SubscribeOptions(qos=1, retainHandling=handling)
            self._client.subscribe(topic_filter, options=options)
        else:
            self._client.subscribe(topic_filter, qos=1)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """QoS 1. While disconnected paho holds it (up to a bound) and sends it on reconnect."""
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            self.dropped_publishes += 1
            return
        self._flush()

    # -- messages -----------------------------------------------------------------------------

    def _message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        self.received += 1
        try:
            self._on_message(msg.topic, bytes(msg.payload), bool(msg.retain))
        except Exception:  # a handler's bug must not take the connection down
            log.exception("unexpected error handling a home broker message on %s", msg.topic)
        finally:
            # After the handler: a task event is in the inbox by now (at least once).
            if msg.qos:
                self._client.ack(msg.mid, msg.qos)

    # -- connection ---------------------------------------------------------------------------

    def start(self) -> None:
        """Begin connecting, in the background."""
        self.loop.every(1.0, self._misc)
        self._probe()

    def _probe(self) -> None:
        self._retry_timer = None
        if self._closed:
            return
        address = self.target.address
        try:
            family, kind, proto, _, sockaddr = socket.getaddrinfo(
                address.host, address.port, type=socket.SOCK_STREAM
            )[0]
            sock = socket.socket(family, kind, proto)
        except OSError as exc:
            self._retry(f"cannot resolve {address}: {exc}")
            return
        sock.setblocking(False)
        rc = sock.connect_ex(sockaddr)
        if rc not in (0, errno.EINPROGRESS):
            sock.close()
            self._retry(f"cannot reach {address}: {errno.errorcode.get(rc, rc)}")
            return
        self._probe_sock = sock
        self.loop.add_writer(sock.fileno(), self._probed)
        self._probe_timer = self.loop.call_later(_PROBE_TIMEOUT_S, self._probed)

    def _probed(self) -> None:
        sock, self._probe_sock = self._probe_sock, None
        if self._probe_timer is not None:
            self._probe_timer.cancel()
            self._probe_timer = None
        if sock is None:
            return
        self.loop.remove_writer(sock.fileno())
        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        try:
            sock.getpeername()
        except OSError:
            error = error or errno.ETIMEDOUT
        sock.close()
        if error:
            self._retry(f"cannot reach {self.target.address}: {errno.errorcode.get(error, error)}")
            return
        self._open()

    def _open(self) -> None:
        try:
            if self._v5:
                props = properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = _SESSION_EXPIRY_S
                self._client.connect(
                    self.target.address.host,
                    self.target.address.port,
                    keepalive=_KEEPALIVE_S,
                    clean_start=False,
                    properties=props,
                )
            else:
                self._client.connect(
                    self.target.address.host, self.target.address.port, keepalive=_KEEPALIVE_S
                )
        except (OSError, ValueError) as exc:
            self._retry(f"connecting failed: {exc}")
            return
        sock = self._client.socket()
        if not isinstance(sock, socket.socket):
            self._retry("paho returned no socket")
            return
        self._watch(sock)

    def _retry(self, why: str, delay_s: float | None = None) -> None:
        if self._closed or self._retry_timer is not None:
            return
        if delay_s is None:
            delay_s, self._backoff_s = self._backoff_s, min(self._backoff_s * 2, _RECONNECT_MAX_S)
            self.state = f"disconnected: {why}"
            log.warning("home broker %s: %s; retrying in %.1f s", self.target, why, delay_s)
        self._retry_timer = self.loop.call_later(delay_s, self._probe)

    def _connected(self, _c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            # Bad credentials, a client id it does not take: it will not change by itself.
            self.state = f"refused: {reason}"
            if not self._refused_said:
                self._refused_said = True
                log.error(
                    "home broker %s refused us: %s (check home_broker_username and the "
                    "password); asking again every %.0f s",
                    self.target,
                    reason,
                    _REFUSED_RETRY_S,
                )
            return  # the broker closes the socket: _lost retries
        for topic_filter, retained in self._filters.items():
            self._subscribe_one(topic_filter, retained)
        self._client.publish(self._availability, b"online", qos=1, retain=True)
        self.connected = True
        self.state = "connected"
        self._backoff_s = 0.5
        self._refused_said = False
        log.info("connected to the home broker %s", self.target)
        self._on_connected()
        self._flush()

    def _disconnected(self, _c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        was = self.connected
        self.connected = False
        if was and not self._closed:
            log.warning("lost the home broker connection (%s)", reason)

    def _lost(self) -> None:
        self._unwatch()
        self.connected = False
        if self.state.startswith("refused"):
            self._retry("refused", _REFUSED_RETRY_S)
        else:
            self._retry("connection lost")

    def close(self) -> None:
        """Availability offline (retained), disconnect. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for timer in (self._probe_timer, self._retry_timer):
            if timer is not None:
                timer.cancel()
        if self._probe_sock is not None:
            self.loop.remove_writer(self._probe_sock.fileno())
            self._probe_sock.close()
            self._probe_sock = None
        if self.connected:
            info = self._client.publish(self._availability, b"offline", qos=1, retain=True)
            self._flush()
            self.loop.run_until(lambda: info.is_published() or self._sock is None, 2.0)
            self._client.disconnect()
            self._flush()
        self._unwatch()
        sock = self._client.socket()
        if isinstance(sock, socket.socket):
            sock.close()
