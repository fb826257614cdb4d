import type { ComponentChildren } from "preact";
import type { Claims } from "../api";

/** Its children when the token holds every scope in `scopes`; otherwise what is missing and how
 * to get it (the gateway would refuse the calls anyway: this only says why up front). */
export function Needs(props: { claims: Claims; scopes: string[]; what: string; children: ComponentChildren }) {
  const missing = props.scopes.filter((scope) => !props.claims.scopes.includes(scope));
  if (missing.length === 0) return <>{props.children}</>;
  return (
    <div class="refusal" data-testid="refusal">
      <strong>Not allowed: {props.what} needs the scope {missing.join(", ")}.</strong>
      <p>
        This token ({props.claims.subject}) holds {props.claims.scopes.length ? props.claims.scopes.join(", ") : "no scopes"}.
        Sign in with a token that has {missing.join(" and ")}, e.g.{" "}
        <code>
          edgeway-token --subject {props.claims.subject} {missing.map((scope) => `--scope ${scope}`).join(" ")}
        </code>
      </p>
    </div>
  );
}

export function ErrorLine(props: { error: string | null }) {
  return props.error ? <p class="error" role="alert">{props.error}</p> : null;
}

export function SocketBadge(props: { state: string; reason?: string }) {
  return (
    <span class={`badge badge-${props.state}`} title={props.reason ?? ""}>
      {props.state}
      {props.reason && props.state !== "open" ? `: ${props.reason}` : ""}
    </span>
  );
}
