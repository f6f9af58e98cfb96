"""`doorstroom demo`: a realistic scenario through the publishing pipeline.

Publishers post once; routing (in the worker, when one runs) fills the inboxes of the
municipalities that should see each update, and the demo prints who received what and why.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from sqlalchemy.orm import Session

from domain import directory, keys, publishing, routing, rules, subscriptions
from domain.audit import SYSTEM, Actor
from domain.bundles import bundle_contents, run_due_bundles
from domain.db import session_scope
from domain.models import (
    Bundle,
    Cadence,
    Classification,
    Group,
    InboxItem,
    Organisation,
    PreventionLevel,
    Priority,
    Role,
    RoutingRule,
    Subscription,
    Update,
)
from domain.settings import get_settings

CITIES = {"11002": "Antwerpen", "44021": "Gent", "12025": "Mechelen", "23088": "Vilvoorde",
          "24062": "Leuven", "34022": "Kortrijk"}
FLEMISH_PROVINCES = ["10000", "20001", "30000", "40000", "70000"]
_ROUTING_WAIT_SECONDS = 30
DAILY_BUNDLE = "Dagelijkse bundel"


def _org(session: Session, *, code: str | None = None, nis: str | None = None) -> Organisation:
    column = Organisation.code if code else Organisation.nis_code
    org = session.scalars(sa.select(Organisation).where(column == (code or nis))).one_or_none()
    if org is None:
        raise SystemExit(f"reference data missing ({code or nis}): run `doorstroom seed` first")
    return org


def _actor(org: Organisation, *scopes: str) -> Actor:
    return Actor(org.id, None, frozenset(scopes))


def _ensure_subscription(session: Session, org: Organisation, name: str,
                         **kwargs: Any) -> None:
    exists = session.scalar(sa.select(Subscription.id).where(
        Subscription.organisation_id == org.id, Subscription.name == name))
    if exists is None:
        subscriptions.create_subscription(session, _actor(org, "subscribe"),
                                          subscriptions.SubscriptionInput(name=name, **kwargs))


def _ensure_setup(session: Session) -> dict[str, Organisation]:
    orgs = {name: _org(session, nis=nis) for nis, name in CITIES.items()}
    orgs.update(ABB=_org(session, code="ABB"), OCAD=_org(session, code="OCAD"),
                DOV=_org(session, code="DOV"), DGEPI=_org(session, code="DGEPI"))
    _ensure_subscription(session, orgs["Antwerpen"], "Radicalisering en preventie",
                         filter={"topics": ["radicalisation", "prevention",
                                            "local-prevention-policy"]})
    _ensure_subscription(session, orgs["Gent"], "Onderwijs en polarisatie",
                         filter={"topics": ["polarisation", "education"],
                                 "target_roles": ["prevention_officer"]})
    _ensure_subscription(session, orgs["Mechelen"], DAILY_BUNDLE,
                         filter={}, cadence=Cadence.daily, send_at="08:00")
    _ensure_subscription(session, orgs["Leuven"], "Lokaal preventiebeleid",
                         filter={"topics": ["local-prevention-policy"],
                                 "publisher_levels": ["flemish"]})
    _ensure_subscription(session, orgs["Kortrijk"], "Alles van de Vlaamse overheid",
                         filter={"publisher_levels": ["flemish"], "min_priority": "important"})
    group_name = "Demo: steden met Vlaamse preventiemiddelen"
    group = session.scalars(sa.select(Group).where(Group.name == group_name)).one_or_none()
    if group is None:
        group = directory.create_group(session, SYSTEM, group_name, None,
                                       [orgs[c].id for c in ("Antwerpen", "Mechelen",
                                                             "Vilvoorde")])
    if session.scalar(sa.select(RoutingRule.id).where(RoutingRule.name.like("Demo:%"))) is None:
        rules.create_rule(session, SYSTEM, name="Demo: OCAD-dreigingsniveau naar elke LIVC",
                          action="route",
                          filter={"topics": ["threat-level"], "publishers": [str(orgs["OCAD"].id)]},
                          targets={"provinces": FLEMISH_PROVINCES})
        rules.create_rule(session, SYSTEM,
                          name="Demo: oproepen actieplannen naar gefinancierde steden",
                          action="route", filter={"topics": ["action-plans"]},
                          targets={"groups": [str(group.id)]})
    return orgs


def _publish(session: Session, publisher: Organisation, **fields: object) -> Update:
    draft = publishing.Draft(**fields)  # type: ignore[arg-type]
    return publishing.publish(session, _actor(publisher, "publish"), draft)


def _wait_for_routing(update_ids: list[uuid.UUID]) -> None:
    """Give the worker time to route; route here if no worker does (demo without `up`)."""
    deadline = time.monotonic() + _ROUTING_WAIT_SECONDS
    while time.monotonic() < deadline:
        with session_scope() as session:
            pending = session.scalars(sa.select(Update.id).where(
                Update.id.in_(update_ids), Update.routed_at.is_(None),
                Update.status != "withdrawn")).all()
        if not pending:
            print("  routed by the worker")
            return
        time.sleep(0.5)
    print("  no worker routed in time: routing in this process instead")
    with session_scope() as session:
        for update_id in pending:
            routing.route_update(session, update_id)


def _describe_reasons(session: Session, item: InboxItem) -> str:
    parts = []
    for reason in item.reasons():
        source = uuid.UUID(reason["id"])
        if reason["kind"] == "subscription":
            sub = session.get(Subscription, source)
            parts.append(f"subscription '{sub.name if sub else source}'")
        elif reason["kind"] == "rule":
            rule = session.get(RoutingRule, source)
            parts.append(f"rule '{rule.name if rule else source}'")
        else:
            parts.append("named in the audience")
    return ", ".join(parts)


def _show_daily_bundle(city: Organisation) -> None:
    """Mechelen reads everything once a day. So that the demo need not wait until 08:00,
    its daily subscription is moved to the coming minute; the scheduler in the worker (or
    this process, if no worker does it in time) builds the bundle when that minute comes."""
    tz = ZoneInfo(get_settings().timezone)
    with session_scope() as session:
        sub = session.scalars(sa.select(Subscription).where(
            Subscription.organisation_id == city.id, Subscription.name == DAILY_BUNDLE)).one()
        now = get_settings().now()
        due = (now + timedelta(minutes=1)).astimezone(tz).replace(second=0, microsecond=0)
        subscriptions.update_subscription(session, _actor(city, "subscribe"), sub.id,
                                          {"send_at": due.strftime("%H:%M")})
        # The window closing now starts where the last one ended, or a day ago.
        if sub.bundled_until is None or sub.bundled_until < now - timedelta(days=1):
            sub.bundled_until = due.astimezone(UTC) - timedelta(days=1)
            session.commit()
        sub_id = sub.id
    print(f"\n4. {city.name} takes a daily bundle; its window closes at {due:%H:%M} "
          "(the demo moved it from 08:00 to the coming minute)")
    deadline = time.monotonic() + 150
    bundle = None
    while time.monotonic() < deadline and bundle is None:
        time.sleep(2)
        with session_scope() as session:
            bundle = session.scalars(sa.select(Bundle).where(
                Bundle.subscription_id == sub_id, Bundle.window_end == due.astimezone(UTC))
            ).one_or_none()
            if bundle is None and get_settings().now() > due + timedelta(seconds=75):
                print("  the scheduler did not build it in time: building it here")
                run_due_bundles(session)
    with session_scope() as session:
        found = session.scalars(sa.select(Bundle).where(Bundle.subscription_id == sub_id)
                                .order_by(Bundle.window_end.desc()).limit(1)).one_or_none()
        if found is None:
            print("  the window was empty: an empty window sends nothing")
            return
        content = bundle_contents(session, [found])[found.id]
    print(f"  bundle {content['id']}: {content['count']} update(s) from every publisher")
    for section in content["sections"]:
        heading = section["topic_name"] or section["topic"] or "(restricted)"
        print(f"    {heading} / {section['publisher']} ({section['count']})")
        for item in section["items"]:
            state = "" if item["state"] == "new" else f" [{item['state']}]"
            print(f"      - {item['title']}{state}")


def play() -> None:
    settings = get_settings()
    print("Doorstroom demo: one platform, every publisher, every local government\n")
    with session_scope() as session:
        orgs = _ensure_setup(session)
        admin_org = _org(session, code="PLATFORM")
        admin_key = keys.issue_key(session, SYSTEM, admin_org.id, ["admin"], "demo admin")
        city_key = keys.issue_key(session, SYSTEM, orgs["Antwerpen"].id,
                                  ["subscribe"], "demo Antwerpen")
        print("1. Publishers post their updates once")
        plans = _publish(session, orgs["ABB"], topics=["action-plans"],
                         title="Oproep: lokale actieplannen preventie 2026-2030",
                         summary="Dien uw lokaal actieplan in voor 31 maart.",
                         body="Het Agentschap Binnenlands Bestuur vraagt elke gemeente ...",
                         prevention_level=PreventionLevel.primary, priority=Priority.important,
                         target_roles=[Role.policy_officer, Role.prevention_officer])
        threat = _publish(session, orgs["OCAD"], topics=["threat-level"],
                          title="Dreigingsniveau: aandachtspunten voor de LIVC",
                          summary="Verhoogde waakzaamheid rond evenementen dit weekend.",
                          priority=Priority.urgent, classification=Classification.internal,
                          target_roles=[Role.livc_coordinator, Role.mayor])
        schools = _publish(session, orgs["DOV"], topics=["harmful-polarisation", "education"],
                           title="Handreiking polarisatie op school",
                           summary="Hoe scholen en preventiewerkers samenwerken.",
                           prevention_level=PreventionLevel.primary,
                           target_roles=[Role.prevention_officer, Role.education_contact])
        wrong = _publish(session, orgs["ABB"], topics=["funding"],
                         title="Subsidieronde verlengd tot 1 april",
                         summary="(verkeerd gepubliceerd)", priority=Priority.important)
        case = _publish(session, orgs["DGEPI"], topics=["reintegration-of-detainees"],
                        title="Casusnota: terugkeer na detentie",
                        body="Vertrouwelijk: alleen voor de LIVC van de betrokken steden.",
                        classification=Classification.restricted,
                        prevention_level=PreventionLevel.tertiary,
                        target_roles=[Role.livc_coordinator],
                        audience={"organisations": [str(orgs["Mechelen"].id),
                                                    str(orgs["Vilvoorde"].id)]})
        first = [plans.id, threat.id, schools.id, wrong.id, case.id]
        titles = {u.id: u.title for u in (plans, threat, schools, wrong, case)}
    for update_id in first:
        print(f"  - {titles[update_id]}")
    _wait_for_routing(first)

    print("\n2. The Department of Education corrects its guidance; ABB withdraws a mistake")
    with session_scope() as session:
        correction = _publish(session, orgs["DOV"], topics=["harmful-polarisation", "education"],
                              supersedes=schools.id,
                              title="Handreiking polarisatie op school (gecorrigeerd)",
                              summary="Met de juiste contactgegevens van het aanspreekpunt.",
                              prevention_level=PreventionLevel.primary,
                              target_roles=[Role.prevention_officer, Role.education_contact])
        publishing.withdraw(session, _actor(orgs["ABB"], "publish"), wrong.id,
                            "verkeerde datum")
    _wait_for_routing([correction.id])

    print("\n3. Who received what, and why")
    with session_scope() as session:
        chains = [plans.chain_id, threat.chain_id, schools.chain_id, wrong.chain_id,
                  case.chain_id]
        for name in CITIES.values():
            org = orgs[name]
            items = session.execute(
                sa.select(InboxItem, Update).join(Update, Update.id == InboxItem.update_id)
                .where(InboxItem.organisation_id == org.id, InboxItem.chain_id.in_(chains))
                .order_by(Update.title)).all()
            print(f"  {name}: {len(items)} item(s)")
            for item, update in items:
                flags = []
                if update.version > 1:
                    flags.append(f"version {update.version}")
                if update.status.value == "withdrawn":
                    flags.append("withdrawn")
                if update.classification is Classification.restricted:
                    flags.append("restricted")
                if item.needs_ack:
                    flags.append("needs acknowledgement")
                suffix = f" [{', '.join(flags)}]" if flags else ""
                print(f"    - {update.title}{suffix}")
                print(f"        why: {_describe_reasons(session, item)}")
        reach = session.execute(sa.select(sa.func.count()).select_from(InboxItem)
                                .where(InboxItem.chain_id == threat.chain_id)).scalar_one()
        print(f"\n  OCAD's notice reached {reach} municipalities through the LIVC rule;"
              " the publisher sees them at GET /v1/updates/{id}/reach")

    base = settings.public_url.rstrip("/")
    _show_daily_bundle(orgs["Mechelen"])

    print("\n5. Try it yourself (keys made for this demo run, shown once):")
    print(f"  curl -H 'Authorization: Bearer {city_key.plaintext}' {base}/v1/inbox")
    print(f"  curl -H 'Authorization: Bearer {admin_key.plaintext}' {base}/v1/routing-rules")
