// Types of the browser client /client.js (served next to it as /client.d.ts). Protocol: docs/PROTOCOL.md.
//
//   import { GatewayClient } from "/client.js";
//   const c = new GatewayClient(["ws://127.0.0.1:8800/ws"]);
//   c.subscribe("/matches/football/5", (m) => console.log(m.seq, m.content));

/** A subject's position: the last message received of it. */
export interface Position {
  epoch: string;
  seq: number;
}

/** One `msg` frame, decoded. */
export interface Message {
  subject: string;
  /** The text (`content`), or for `content_b64` the decoded bytes as a binary string (atob). */
  content: string;
  /** The message's bytes. */
  data: Uint8Array;
  epoch: string;
  seq: number;
  prev?: number;
  ts?: number;
  /** The subject's snapshot (its latest message), sent on subscribe when there is nothing to replay. */
  snapshot: boolean;
}

/** A frame, to or from the gateway (JSON object with an `op`). */
export type Frame = { op: string; [field: string]: unknown };

export type Verdict = "deliver" | "duplicate" | "gap";
export type ErrorKind = "publish" | "subscribe" | "refresh" | "connect" | "other" | "unknown";

/** What the tracker's `receive` returns. */
export type TrackerEvent =
  | { type: "deliver"; message: Message }
  | { type: "subscribed"; subject: string; epoch: string | null; seq: number | null; recovered: boolean;
      tracked: boolean }
  | { type: "gap"; subject: string; epoch: string; seq: number; gotSeq: number; gotPrev: number | undefined }
  | { type: "refused"; subject: string; frame: Frame; tracked: boolean }
  | { type: "unsubscribed"; subject: string };

export interface TrackerStats {
  messages: number;
  duplicates: number;
  gaps: number;
  resubscribes: number;
}

export interface ClientStats extends TrackerStats {
  reconnects: number;
  refreshes: number;
  expired: number;
}

/** The `exp` claim of a JWT (seconds since the epoch), read without verifying it; null if none. */
export function tokenExp(token: string | null | undefined): number | null;

/** Milliseconds from `nowMs` until a token expiring at `expS` should be refreshed. */
export function refreshDelay(expS: number, nowMs: number, leadMs: number): number;

/** A `msg` frame as a Message, or null when a required field is missing or mistyped. */
export function decodeMessage(frame: Frame): Message | null;

/** What to do with a message given the subject's last position. */
export function classify(last: Position | undefined | null, epoch: string, seq: number,
                         prev: number | undefined | null,
                         options?: { snapshot?: boolean; skipPrev?: boolean }): Verdict;

/** What an `error` frame answers, from its `request` field (1.1); "unknown" from a 1.0 gateway. */
export function errorKind(frame: Frame): ErrorKind;

/** The subscription rules without I/O: frames in, events and frames out (no socket, no timer, no DOM). */
export class SubscriptionTracker {
  constructor();
  /** subject -> last position; a caller may rewind one before subscribing again. */
  readonly positions: Map<string, Position>;
  readonly stats: TrackerStats;
  readonly connected: boolean;
  readonly subjects: string[];
  has(subject: string): boolean;
  subscribe(subjects: string[], positions?: Map<string, Position> | Record<string, Position> | null): void;
  unsubscribe(subject: string): void;
  drop(subject: string): boolean;
  connectionMade(): number;
  connectionLost(): void;
  framesToSend(): Frame[];
  receive(frame: Frame): TrackerEvent[];
}

export class GatewayError extends Error {
  constructor(code: string, message: string, extra?: Record<string, unknown>);
  code: string;
  /** The op of the request the error answers (1.1), when the gateway said. */
  request?: string;
  subject?: string;
  id?: string | number;
  /** `code` "connection_closed" (a publish refused because the client is not connected, or lost with
   * the connection before its ack, stored or not): the WebSocket close code (1006: no close frame). */
  closeCode?: number;
}

export type Status = "connecting" | "connected" | "disconnected" | "reconnecting" | "subscribed"
  | "token provider failed";

export interface GatewayClientOptions {
  /** A JWT, or a function (sync or async) returning a fresh one at every (re)connect and refresh. */
  token?: string | null | (() => string | Promise<string>);
  refreshLead?: number;
  name?: string;
  /** Reconnect backoff (full jitter), in ms: 100 and 10000. The backoff starts over only after a
   * connection that lasted `backoffMax`: one dropped right after `connected` is retried later and later. */
  backoffInitial?: number;
  backoffMax?: number;
  /** ms (10000) for the token provider's answer and from dialing to `connected`; then the attempt fails. */
  connectTimeout?: number;
  /** `detail`: the URL (connecting), server (connected), "code reason" (disconnected), ms until the
   * next attempt (reconnecting), the `subscribed` frame (subscribed), the error text (token). */
  onStatus?: (state: Status, detail: any) => void;
  onError?: (error: GatewayError) => void;
}

export interface Ack extends Frame {
  op: "ack";
  subject: string;
  epoch: string;
  seq: number;
  id: number;
}

export class GatewayClient {
  constructor(urls: string | string[], options?: GatewayClientOptions);
  readonly urls: string[];
  readonly connected: boolean;
  readonly tracker: SubscriptionTracker;
  /** The tracker's positions; a refused or ended subscription keeps its own (unsubscribe forgets it). */
  readonly positions: Map<string, Position>;
  readonly handlers: Map<string, Set<(message: Message) => void>>;
  readonly stats: ClientStats;
  /** Subscribe (again: asks from the subject's position). Returns a function that unsubscribes. */
  subscribe(subject: string, callback?: (message: Message) => void): () => void;
  unsubscribe(subject: string, callback?: (message: Message) => void): void;
  /** With `ack` (the default), resolves with the gateway's ack, rejects with its GatewayError. Never
   * queued nor resent: while not connected it rejects at once (also without `ack`), and a connection
   * lost before the ack rejects it; both with code "connection_closed", as the Python client does. */
  publish(subject: string, content: string, options?: { ack?: true }): Promise<Ack>;
  publish(subject: string, content: string, options: { ack: false }): Promise<null>;
  close(): void;
}
