// A small dashboard module written against the client generated from /openapi.json
// (`npm run generate`): it must type-check with `tsc --strict` (`npm run check`).
import type { paths } from "./schema";

type Groups = paths["/api/v1/groups"];
type GroupsQuery = NonNullable<Groups["get"]["parameters"]["query"]>;
type GroupsPage = Groups["get"]["responses"][200]["content"]["application/json"];
type GroupSummary = GroupsPage["items"][number];
type GroupCreate = Groups["post"]["requestBody"]["content"]["application/json"];
type Group = Groups["post"]["responses"][201]["content"]["application/json"];
type Invalid = Groups["post"]["responses"][422]["content"]["application/problem+json"];
type Summary =
  paths["/api/v1/analytics/summary"]["get"]["responses"][200]["content"]["application/json"];

// The types used here are the service's models, never `unknown` or `any`.
type Known<T> = unknown extends T ? false : true;
type Assert<T extends true> = T;
export type Checks = [
  Assert<Known<GroupSummary>>,
  Assert<Known<GroupSummary["channel_count"]>>,
  Assert<Known<Group>>,
  Assert<Known<Group["mode"]>>,
  Assert<Known<Group["channels"][number]["invite_link"]>>,
  Assert<Known<Summary["latency_ms"]["p95"]>>,
  Assert<Known<Invalid["errors"][number]["loc"][number]>>,
];

const BASE = "https://channelgate.example.com";

async function get<T>(path: string, token: string): Promise<T> {
  const response = await fetch(BASE + path, { headers: { Authorization: `Bearer ${token}` } });
  if (!response.ok) throw new Error(`${response.status} from ${path}`);
  return (await response.json()) as T;
}

/** Every group, page by page: next_cursor is null on the last page. */
export async function allGroups(token: string): Promise<GroupSummary[]> {
  const groups: GroupSummary[] = [];
  let cursor: string | null = null;
  do {
    const query: GroupsQuery = { limit: 200, sort: "title", ...(cursor ? { cursor } : {}) };
    const params = new URLSearchParams(
      Object.entries(query).map(([name, value]) => [name, String(value)]),
    );
    const page: GroupsPage = await get<GroupsPage>(`/api/v1/groups?${params}`, token);
    groups.push(...page.items);
    cursor = page.next_cursor;
  } while (cursor !== null);
  return groups;
}

/** A line per group, reading the fields the dashboard shows. */
export function describe(group: GroupSummary): string {
  const members: string = group.member_count === null ? "?" : String(group.member_count);
  const handle: string = group.username ?? "no username";
  const state: string = group.is_active ? "protected" : "paused";
  return `${group.title} (${handle}): ${group.channel_count} channel(s), ${members} members, ${state}, v${group.version}`;
}

/** The week's headline numbers. */
export async function weekly(token: string, group?: number): Promise<string> {
  const query = group === undefined ? "" : `?group=${group}`;
  const summary = await get<Summary>(`/api/v1/analytics/summary${query}`, token);
  const rate: string = summary.pass_rate === null ? "–" : `${Math.round(summary.pass_rate * 100)} %`;
  const p95: number | null = summary.latency_ms.p95;
  return `${summary.checks} checks, ${rate} passed, ${summary.unique_users} users, p95 ${p95 ?? "–"} ms`;
}

/** Create a group with its defaults; on a 422, say which input and quote the request id. */
export async function protect(token: string, chatId: number, title: string): Promise<Group | string> {
  const body: GroupCreate = { chat_id: chatId, title }; // every setting has a default
  const response = await fetch(`${BASE}/api/v1/groups`, {
    method: "POST",
    headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  if (response.status === 422) {
    const problem = (await response.json()) as Invalid;
    const where: string = problem.errors[0]?.loc.join(".") ?? "the request";
    return `${where}: ${problem.detail} (request ${problem.request_id})`;
  }
  if (response.status !== 201) throw new Error(`${response.status} creating ${chatId}`);
  const group = (await response.json()) as Group;
  const mode: "all" | "any" = group.mode; // always sent, so never optional here
  const muteSeconds: number = group.mute_seconds;
  console.log(`${group.title}: ${mode}, mute ${muteSeconds} s, ${group.channels.length} channels`);
  return group;
}
