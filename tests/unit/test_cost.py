"""The cost model charges what the AWS price pages say, on hand-checkable cases (§8)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flstore_core.cost import (
    DEFAULT_PRICES,
    PAPER_ARTIFACT_SOURCE,
    PRICES_FILE_ENV,
    Invocation,
    Prices,
    RequestLoad,
    SweepInputs,
    aggregator_amortised_cost,
    aggregator_duration_cost,
    aggregator_hourly,
    amortised_server_cost,
    answer_cost,
    cache_agg_cost,
    crossover_rate,
    flstore_amortised_cost,
    flstore_overhead_per_request,
    flstore_request_cost,
    idle_monthly_cost,
    invocations_cost,
    load_prices,
    objstore_agg_cost,
    paper_artifact_cost,
    reduction,
    reduction_summary,
    round_work_cost,
    router_invocation,
    s3_requests_cost,
    server_request_cost,
    sweep_point,
)
from flstore_core.errors import ValidationError

GB_S = 0.0000166667  # Lambda x86_64, USD per GB-second
LAMBDA_REQ = 0.20 / 1e6
API_REQ = 1.00 / 1e6
S3_GET = 0.0004 / 1e3
S3_PUT = 0.005 / 1e3


def test_default_prices_are_the_published_us_east_1_prices() -> None:
    p = DEFAULT_PRICES
    assert p.lambda_gb_second_x86 == 0.0000166667
    assert p.lambda_gb_second_arm == 0.0000133334
    assert p.lambda_requests_per_million == 0.20
    assert p.api_gateway_http_per_million == 1.00
    assert p.s3_get_per_thousand == 0.0004
    assert p.s3_put_per_thousand == 0.005
    assert (p.ec2_aggregator_instance, p.ec2_aggregator_hourly) == ("m5.xlarge", 0.192)
    assert (p.elasticache_node_type, p.elasticache_node_hourly) == ("cache.r6g.large", 0.206)
    assert p.region == "us-east-1"


def test_every_price_in_the_table_names_its_source_and_date() -> None:
    rows = DEFAULT_PRICES.table()
    prices = [row for row in rows if isinstance(row["value"], float)]
    assert len(prices) == 10
    for row in prices:
        if row["name"].startswith("paper_"):
            assert row["source"] == PAPER_ARTIFACT_SOURCE, row
        else:
            assert str(row["source"]).startswith("https://aws.amazon.com/"), row
        assert row["checked"] == "2026-11"
        assert row["unit"]


def test_one_invocation_of_100_ms_at_1024_mb_is_a_tenth_of_a_gb_second() -> None:
    cost = flstore_request_cost([Invocation("cache-0", 100, 1024)])
    assert cost.lambda_compute == pytest.approx(0.1 * GB_S)
    assert cost.lambda_requests == pytest.approx(LAMBDA_REQ)
    assert cost.api_gateway == pytest.approx(API_REQ)
    assert cost.s3 == 0
    assert cost.total == pytest.approx(0.1 * GB_S + LAMBDA_REQ + API_REQ)


def test_billed_duration_is_rounded_up_to_the_next_millisecond() -> None:
    assert Invocation("f", 100.01, 1024).gb_seconds == pytest.approx(0.101)
    assert Invocation("f", 100.0, 1024).gb_seconds == pytest.approx(0.100)
    assert Invocation("f", 0.2, 2048).gb_seconds == pytest.approx(0.002)


def test_memory_is_converted_at_1024_mb_per_gb() -> None:
    assert Invocation("f", 1000, 3008).gb_seconds == pytest.approx(3008 / 1024)


def test_arm64_invocations_are_charged_the_arm_price() -> None:
    cost = flstore_request_cost([Invocation("f", 1000, 1024, "arm64")], api_requests=0)
    assert cost.lambda_compute == pytest.approx(0.0000133334)


def test_several_invocations_and_s3_requests_add_up() -> None:
    invocations = [Invocation("router", 20, 512), Invocation("cache-1", 250, 3008)]
    cost = flstore_request_cost(invocations, s3_gets=10, s3_puts=1, api_requests=1)
    compute = (0.020 * 0.5 + 0.250 * 3008 / 1024) * GB_S
    assert cost.lambda_compute == pytest.approx(compute)
    assert cost.lambda_requests == pytest.approx(2 * LAMBDA_REQ)
    assert cost.s3 == pytest.approx(10 * S3_GET + S3_PUT)
    assert cost.total == pytest.approx(compute + 2 * LAMBDA_REQ + API_REQ + 10 * S3_GET + S3_PUT)
    assert cost.to_dict() == {
        "lambda_compute": cost.lambda_compute,
        "lambda_requests": cost.lambda_requests,
        "api_gateway": cost.api_gateway,
        "s3": cost.s3,
        "total": cost.total,
    }


def test_overrides_change_the_totals() -> None:
    prices = load_prices({"lambda_gb_second_x86": 1.0, "api_gateway_http_per_million": 0})
    cost = flstore_request_cost([Invocation("f", 500, 2048)], prices=prices)
    assert cost.lambda_compute == pytest.approx(1.0)
    assert cost.api_gateway == 0
    assert prices.s3_get_per_thousand == DEFAULT_PRICES.s3_get_per_thousand


def test_prices_file_is_read_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    file = tmp_path / "prices.json"
    file.write_text(json.dumps({"ec2_aggregator_hourly": 0.384, "region": "eu-west-1"}))
    monkeypatch.setenv(PRICES_FILE_ENV, str(file))
    prices = load_prices({"region": "eu-west-2"})
    assert prices.ec2_aggregator_hourly == 0.384
    assert prices.region == "eu-west-2"  # the dict overrides the file


def test_without_overrides_the_defaults_are_returned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PRICES_FILE_ENV, raising=False)
    assert load_prices() == DEFAULT_PRICES == Prices()


def test_unknown_price_key_is_rejected() -> None:
    with pytest.raises(ValidationError, match="unknown price 'lambda_gb_sec'"):
        load_prices({"lambda_gb_sec": 1.0})


def test_unknown_key_in_a_prices_file_is_rejected(tmp_path: Path) -> None:
    file = tmp_path / "prices.json"
    file.write_text(json.dumps({"ec2_hourly": 1.0}))
    with pytest.raises(ValidationError, match="unknown price 'ec2_hourly'"):
        load_prices(path=file)


@pytest.mark.parametrize("value", [-1.0, "0.2", None, True, float("nan")])
def test_bad_price_values_are_rejected(value: object) -> None:
    with pytest.raises(ValidationError):
        load_prices({"s3_get_per_thousand": value})


def test_missing_prices_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="does not exist"):
        load_prices(path=tmp_path / "nope.json")


def test_bad_invocations_are_rejected() -> None:
    with pytest.raises(ValidationError):
        Invocation("f", -1, 1024)
    with pytest.raises(ValidationError):
        Invocation("f", 10, 0)


def test_server_cost_is_duration_times_hourly_price() -> None:
    assert server_request_cost(3_600_000, 0.192) == pytest.approx(0.192)
    assert server_request_cost(1000, 0.192) == pytest.approx(1000 / 3.6e6 * 0.192)
    assert server_request_cost(0, 0.192) == 0


def test_amortised_cost_spreads_the_hourly_price_over_the_request_rate() -> None:
    assert amortised_server_cost(0.192, 3600) == pytest.approx(0.192 / 3600)
    with pytest.raises(ValidationError):
        amortised_server_cost(0.192, 0)


def test_objstore_agg_pays_the_aggregator_and_its_gets() -> None:
    cost = objstore_agg_cost(2000, s3_gets=10)
    assert cost == pytest.approx(2000 / 3.6e6 * 0.192 + 10 * S3_GET)


def test_cache_agg_pays_the_aggregator_and_the_cache_node() -> None:
    assert cache_agg_cost(2000) == pytest.approx(2000 / 3.6e6 * (0.192 + 0.206))


def test_idle_cost_of_8_nodes_of_3008_mb_pinged_every_5_minutes() -> None:
    pings = 8 * 30 * 24 * 60 / 5  # 69,120 a month
    gb_s = pings * 0.002 * 3008 / 1024  # 406.08 GB-s
    expected = gb_s * GB_S + pings * LAMBDA_REQ
    cost = idle_monthly_cost(8, 3008, 5)
    assert pings == 69_120
    assert cost == pytest.approx(expected)
    assert cost == pytest.approx(0.0206, abs=5e-5)  # about two cents a month


def test_idle_cost_rounds_the_ping_up_to_a_millisecond() -> None:
    assert idle_monthly_cost(1, 1024, 1, ping_ms=0.3) == pytest.approx(
        43_200 * (0.001 * GB_S + LAMBDA_REQ)
    )


def test_idle_cost_rejects_a_zero_interval() -> None:
    with pytest.raises(ValidationError):
        idle_monthly_cost(8, 3008, 0)


# ---------------------------------------------------------------------- amortised accounting

PAPER_LOAD = RequestLoad(requests_per_round=18, rounds_per_minute=1.0)


def test_the_paper_load_is_1080_requests_an_hour_and_43200_rounds_a_month() -> None:
    assert PAPER_LOAD.requests_per_hour == 18 * 60
    assert PAPER_LOAD.rounds_per_month == 30 * 24 * 60
    assert RequestLoad(10, 0.5).requests_per_hour == 300


@pytest.mark.parametrize("args", [(0, 1.0), (18, 0.0), (18, -1.0), (18, float("nan")), (1.5, 1.0)])
def test_a_load_needs_positive_rates(args: tuple[object, object]) -> None:
    with pytest.raises(ValidationError):
        RequestLoad(*args)  # type: ignore[arg-type]


def test_s3_requests_cost_gets_and_puts_at_their_prices() -> None:
    assert s3_requests_cost(10, 2) == pytest.approx(10 * S3_GET + 2 * S3_PUT, rel=1e-12)
    with pytest.raises(ValidationError):
        s3_requests_cost(-1, 0)


def test_baseline_hourly_prices_are_the_aggregator_and_the_cache_node() -> None:
    assert aggregator_hourly("objstore-agg") == 0.192
    assert aggregator_hourly("cache-agg") == pytest.approx(0.192 + 0.206)
    with pytest.raises(ValidationError):
        aggregator_hourly("flstore-warm")


def test_amortised_baseline_request_is_the_hour_over_1080_requests_plus_its_s3_requests() -> None:
    # objstore-agg at one round a minute, 18 workloads: $0.192 / 1080 + 10 GETs + 1 PUT
    got = aggregator_amortised_cost("objstore-agg", PAPER_LOAD, s3_gets=10, s3_puts=1)
    assert got == pytest.approx(0.192 / 1080 + 10 * S3_GET + S3_PUT, rel=1e-12)
    # cache-agg pays both servers and, reading Redis, no GET
    assert aggregator_amortised_cost("cache-agg", PAPER_LOAD) == pytest.approx(0.398 / 1080)
    # independent of how long the request took: the servers are paid either way
    slower = RequestLoad(18, 0.5)
    assert aggregator_amortised_cost("cache-agg", slower) == pytest.approx(0.398 / 540)


def test_duration_baseline_request_pays_the_servers_for_its_duration_only() -> None:
    # 3.6 s on objstore-agg: a thousandth of an hour of $0.192, plus 10 GETs
    got = aggregator_duration_cost("objstore-agg", 3600.0, s3_gets=10)
    assert got == pytest.approx(0.192 / 1000 + 10 * S3_GET, rel=1e-12)
    assert aggregator_duration_cost("cache-agg", 36.0) == pytest.approx(0.398 / 100_000)
    # the baseline's own per-request figure is the same formula (objstore_agg_cost)
    assert aggregator_duration_cost("objstore-agg", 1234.0, 7) == pytest.approx(
        objstore_agg_cost(1234.0, 7)
    )


def test_invocations_cost_is_lambda_only() -> None:
    inv = [Invocation("cache-0", 1000.0, 2048), Invocation("cache-1", 500.0, 1024)]
    assert invocations_cost(inv) == pytest.approx(2.5 * GB_S + 2 * LAMBDA_REQ, rel=1e-12)
    assert invocations_cost([]) == 0.0


def test_round_work_is_the_prefetch_invocations_and_their_s3_requests() -> None:
    # two nodes each load for 4 s at 3008 MB, 20 GETs and the default model's PUT
    inv = [Invocation("cache-0", 4000.0, 3008), Invocation("cache-1", 4000.0, 3008)]
    expected = 2 * 4 * 3008 / 1024 * GB_S + 2 * LAMBDA_REQ + 20 * S3_GET + S3_PUT
    assert round_work_cost(inv, s3_gets=20, s3_puts=1) == pytest.approx(expected, rel=1e-12)


def test_overhead_per_request_spreads_the_round_and_the_keep_warm_month() -> None:
    idle = idle_monthly_cost(2, 3008, 5)
    got = flstore_overhead_per_request(1.8e-3, idle, PAPER_LOAD)
    assert got == pytest.approx((1.8e-3 + idle / 43_200) / 18, rel=1e-12)
    # half as many rounds a month: each carries twice the keep-warm share
    half = flstore_overhead_per_request(0.0, idle, RequestLoad(18, 0.5))
    assert half == pytest.approx(idle / 21_600 / 18, rel=1e-12)
    with pytest.raises(ValidationError):
        flstore_overhead_per_request(-1.0, idle, PAPER_LOAD)


def test_flstore_request_is_its_answers_cost_and_its_overhead_share() -> None:
    # meta.cost_usd of $2e-6 (the router's invocation already in it), $1e-5 of round work
    assert flstore_amortised_cost(2e-6, 1e-5) == pytest.approx(2e-6 + 1e-5, rel=1e-12)
    with pytest.raises(ValidationError):
        flstore_amortised_cost(-1e-6, 0.0)


def test_an_answer_bills_its_nodes_its_router_api_gateway_and_s3() -> None:
    # one node for 40 ms at 3008 MB, the 512 MB router for 52.2 ms (billed 53), 6 GETs, 1 PUT
    node = Invocation("cache-1", 40.0, 3008)
    got = answer_cost([node], router_invocation(52.2), s3_gets=6, s3_puts=1)
    assert got["nodes"] == pytest.approx(0.04 * 3008 / 1024 * GB_S + LAMBDA_REQ, rel=1e-12)
    assert got["router"] == pytest.approx(0.053 * 0.5 * GB_S + LAMBDA_REQ, rel=1e-12)
    assert got["api_gateway"] == pytest.approx(API_REQ, rel=1e-12)
    assert got["s3"] == pytest.approx(6 * S3_GET + S3_PUT, rel=1e-12)
    # HTTP API requests are metered per started 512 KB: a 600 KB body is two requests
    big = answer_cost([], router_invocation(1.0, 1024), request_bytes=600 * 1024)
    assert big["api_gateway"] == pytest.approx(2 * API_REQ, rel=1e-12)
    assert big["nodes"] == 0.0 and big["router"] == pytest.approx(0.001 * GB_S + LAMBDA_REQ)


def test_the_paper_artifact_charges_wall_time_at_its_two_hourly_rates() -> None:
    # 3.6 s: a thousandth of an hour, at 0.922 $/h for a baseline and 0.11988 $/h for FLStore
    assert paper_artifact_cost("cache-agg", 3600.0) == pytest.approx(0.922e-3, rel=1e-12)
    assert paper_artifact_cost("objstore-agg", 3600.0) == pytest.approx(0.922e-3, rel=1e-12)
    assert paper_artifact_cost("flstore-warm", 3600.0) == pytest.approx(0.11988e-3, rel=1e-12)
    cheaper = load_prices({"paper_function_hourly": 0.06})
    assert paper_artifact_cost("flstore-warm", 3600.0, cheaper) == pytest.approx(0.06e-3)
    with pytest.raises(ValidationError):
        paper_artifact_cost("aggregator", 1.0)


SWEEP = SweepInputs(
    flstore_request_usd=2e-6,
    round_work_usd=1.8e-4,
    idle_hourly_usd=0.01,
    baseline_s3_usd={"objstore-agg": 5e-6, "cache-agg": 0.0},
)


def test_a_sweep_point_spreads_each_systems_fixed_costs_over_its_rate() -> None:
    # 18 requests a round, 60 rounds an hour: 1,080 requests an hour
    p = sweep_point(SWEEP, 18, 60)
    assert p["requests_per_hour"] == 1080
    assert p["flstore_usd"] == pytest.approx(2e-6 + 1e-5 + 0.01 / 1080, rel=1e-12)
    assert p["objstore_usd"] == pytest.approx(0.192 / 1080 + 5e-6, rel=1e-12)
    assert p["cache_usd"] == pytest.approx(0.398 / 1080, rel=1e-12)
    # one request an hour: FLStore pays a whole round's work and an hour of keep-warm for it
    one = sweep_point(SWEEP, 1, 1)
    assert one["flstore_usd"] == pytest.approx(2e-6 + 1.8e-4 + 0.01, rel=1e-12)
    assert one["cache_usd"] == pytest.approx(0.398, rel=1e-12)
    with pytest.raises(ValidationError):
        sweep_point(SWEEP, 0, 1)


def test_the_crossover_is_where_the_two_lines_meet() -> None:
    # A = 2e-6 + 1.8e-4 / 18 = 1.2e-5; objstore: (0.192 - 0.01) / (1.2e-5 - 5e-6) = 26,000/h
    assert crossover_rate(SWEEP, "objstore-agg", 18) == pytest.approx(26_000, rel=1e-9)
    # cache-agg: (0.398 - 0.01) / 1.2e-5 = 32,333.3/h; there the two points cost the same
    rate = crossover_rate(SWEEP, "cache-agg", 18)
    assert rate == pytest.approx(0.388 / 1.2e-5, rel=1e-9)
    at = sweep_point(SWEEP, 18, rate / 18)
    assert at["flstore_usd"] == pytest.approx(at["cache_usd"], rel=1e-9)
    below, above = sweep_point(SWEEP, 18, rate / 36), sweep_point(SWEEP, 18, rate / 9)
    assert below["flstore_usd"] < below["cache_usd"] and above["flstore_usd"] > above["cache_usd"]
    # FLStore's marginal request at or below the baseline's S3 cost: cheaper at every rate
    free = SweepInputs(1e-6, 0.0, 0.0, {"objstore-agg": 5e-6})
    assert crossover_rate(free, "objstore-agg", 18) is None
    # keep-warm dearer than the servers: cheaper at no low rate
    dear = SweepInputs(1e-6, 0.0, 1.0, {})
    assert crossover_rate(dear, "cache-agg", 18) == 0.0


def test_reduction_is_one_minus_the_ratio() -> None:
    assert reduction(25.0, 100.0) == pytest.approx(0.75)
    assert reduction(200.0, 100.0) == pytest.approx(-1.0)  # twice as slow: -100 %
    with pytest.raises(ValidationError):
        reduction(1.0, 0.0)


def test_reduction_summary_is_the_mean_and_the_largest_over_workloads() -> None:
    summary = reduction_summary([(10.0, 100.0), (50.0, 100.0), (120.0, 100.0)])
    assert summary["avg"] == pytest.approx((0.9 + 0.5 - 0.2) / 3)
    assert summary["peak"] == pytest.approx(0.9)
    with pytest.raises(ValidationError):
        reduction_summary([])
