"""Routing rules and the routing preview (admin)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response, status

from api.deps import AdminDep, SessionDep
from api.ids import parse_id, parse_ref
from api.pages import page_response
from api.problems import responses
from api.routes.updates import draft_from
from api.schemas import ListOf, PreviewIn, PreviewOut, RuleCreate, RuleOut
from domain import matching, publishing, routing, rules
from domain.errors import InvalidInput
from domain.models import Organisation, RoutingRule

router = APIRouter(prefix="/v1/routing-rules", tags=["routing"], responses=responses(404))


def rule_out(rule: RoutingRule) -> dict[str, Any]:
    return {"id": str(rule.id), "name": rule.name, "description": rule.description,
            "action": rule.action.value, "filter": rule.filter, "targets": rule.targets,
            "active": rule.active, "created_at": rule.created_at}


@router.post("", status_code=status.HTTP_201_CREATED, response_model=RuleOut)
def create(body: RuleCreate, actor: AdminDep, session: SessionDep,
           response: Response) -> dict[str, Any]:
    rule = rules.create_rule(session, actor, name=body.name, action=body.action,
                             filter=body.filter.model_dump(mode="json"),
                             targets=body.targets.model_dump(), description=body.description)
    response.headers["Location"] = f"/v1/routing-rules/{rule.id}"
    return rule_out(rule)


@router.get("", response_model=ListOf[RuleOut])
def list_(request: Request, response: Response, _actor: AdminDep, session: SessionDep,
          cursor: Annotated[str | None, Query(max_length=500)] = None,
          limit: Annotated[int | None, Query(ge=1, le=200)] = None) -> dict[str, Any]:
    return page_response(request, response, rules.list_rules(session, cursor, limit), rule_out)


@router.get("/{rule_id}", response_model=RuleOut)
def get(rule_id: str, _actor: AdminDep, session: SessionDep) -> dict[str, Any]:
    return rule_out(rules.get_rule(session, parse_id(rule_id, "routing rule")))


@router.delete("/{rule_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete(rule_id: str, actor: AdminDep, session: SessionDep) -> Response:
    rules.delete_rule(session, actor, parse_id(rule_id, "routing rule"))
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/preview", response_model=PreviewOut)
def preview(body: PreviewIn, actor: AdminDep, session: SessionDep) -> dict[str, Any]:
    """Who would receive this draft update, and why. Publishes and writes nothing."""
    publisher_id = (parse_ref(body.publisher_id, "publisher_id") if body.publisher_id
                    else actor.organisation_id)
    if publisher_id is None or session.get(Organisation, publisher_id) is None:
        raise InvalidInput("publisher_id must name an organisation", field="publisher_id")
    draft = draft_from(body)
    topic_ids, audience = publishing.validate_draft(session, publisher_id, draft)
    plan = routing.make_plan(
        session, publisher_id=publisher_id, topic_ids=frozenset(topic_ids.values()),
        prevention_level=draft.prevention_level, priority=draft.priority,
        roles_mask=matching.roles_mask(draft.target_roles),
        classification=draft.classification, audience=audience, update_id=None)
    recipients = routing.preview(session, plan)
    return {"items": [{"organisation_id": str(r.organisation_id), "name": r.name,
                       "reasons": r.reasons} for r in recipients],
            "next_cursor": None, "total": len(recipients)}
