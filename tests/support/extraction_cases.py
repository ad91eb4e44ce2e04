"""Extraction cases with known answers: short texts from templates, three Pydantic models.

`generate_cases()` builds the same cases on every run (``random.Random(seed)``):
payments (flat model `Payment`), new hires with company addresses (nested model
`Hire`), and purchase orders (a list of objects with enums and integer bounds,
`Order`). Mostly English; a Japanese share (UTF-8, full-width digits) is a
robustness case for an English model, not an accuracy target, and is reported
apart. Each case keeps its truth as the JSON the model should produce; a truth
value may be an `Accept` of several spellings (Japanese place names, countries).

`score(truth, output)` counts correct leaf fields. Strings compare after Unicode
NFKC (full-width digits become ASCII), case folding and with whitespace and
trailing punctuation removed; numbers within 0.005; list items by position,
where a missing or an extra item counts as wrong fields.
"""

# The Japanese texts use full-width digits and signs on purpose.
# ruff: noqa: RUF001, RUF002

from __future__ import annotations

import datetime as dt
import math
import random
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field

# ------------------------------------------------------------------ the three models


class Payment(BaseModel):
    """Flat: one payment."""

    payer: str = Field(description="full name of the person who paid")
    company: str = Field(description="name of the company that was paid")
    date: dt.date = Field(description="date of the payment")
    amount: float = Field(description="amount paid, as a number")
    currency: str = Field(description="three-letter currency code, e.g. USD")


class Person(BaseModel):
    first_name: str
    last_name: str


class Address(BaseModel):
    street: str = Field(description="street and number")
    city: str
    postal_code: str
    country: str


class Company(BaseModel):
    name: str
    address: Address


class Hire(BaseModel):
    """Nested: a person who joined a company, and where the company is."""

    person: Person
    job_title: str
    company: Company
    start_date: dt.date


class Currency(StrEnum):
    USD = "USD"
    EUR = "EUR"
    GBP = "GBP"
    JPY = "JPY"


class Unit(StrEnum):
    piece = "piece"
    box = "box"
    kg = "kg"
    hour = "hour"


class OrderLine(BaseModel):
    product: str
    quantity: int = Field(ge=1, le=500)
    unit: Unit
    unit_price: float = Field(description="price of one unit")


class Order(BaseModel):
    """A list of objects with enums and numeric bounds: a purchase order."""

    order_id: str
    customer: str = Field(description="name of the company that ordered")
    order_date: dt.date
    currency: Currency
    lines: list[OrderLine] = Field(min_length=1, max_length=4)


MODELS: dict[str, type[BaseModel]] = {"flat": Payment, "nested": Hire, "list": Order}


@dataclass(frozen=True)
class Accept:
    """A truth value with several right spellings."""

    values: tuple[Any, ...]


@dataclass(frozen=True)
class Case:
    """One text and the JSON the model should extract from it."""

    id: str
    schema: str  # flat | nested | list (a key of MODELS)
    lang: str  # en | ja
    text: str
    truth: dict[str, Any]

    @property
    def model(self) -> type[BaseModel]:
        return MODELS[self.schema]


# ------------------------------------------------------------------ vocabulary

FIRST = (
    "Alice",
    "Maria",
    "James",
    "Olivia",
    "Daniel",
    "Sofia",
    "Liam",
    "Emma",
    "Noah",
    "Chloe",
    "Ethan",
    "Grace",
    "Lucas",
    "Hannah",
    "Oliver",
    "Zoe",
    "Samuel",
    "Ruth",
    "Victor",
    "Nora",
    "Henry",
    "Ivy",
    "Oscar",
    "Clara",
    "Felix",
    "Laura",
    "Adam",
    "Eva",
    "Leo",
    "Mia",
)
LAST = (
    "Smith",
    "Rossi",
    "Tanaka",
    "Novak",
    "Garcia",
    "Becker",
    "Dubois",
    "Kowalski",
    "Jensen",
    "Murphy",
    "Silva",
    "Larsen",
    "Fischer",
    "Moreau",
    "Walsh",
    "Keller",
    "Brooks",
    "Patel",
    "Nguyen",
    "Ortiz",
    "Hughes",
    "Lindqvist",
    "Costa",
    "Weber",
    "Hart",
    "Reyes",
    "Quinn",
    "Fleming",
    "Bauer",
    "Carter",
)
COMPANIES = (
    "Northwind Traders",
    "Blue Harbor Ltd",
    "Acme Tools Inc",
    "Greenfield Foods",
    "Silverline Logistics",
    "Brightway Solar",
    "Maple Leaf Printing",
    "Redstone Builders",
    "Orion Software GmbH",
    "Lakeside Dental Clinic",
    "Pioneer Textiles",
    "Cobalt Analytics",
    "Summit Outdoor Gear",
    "Harbor View Hotel",
    "Evergreen Nursery",
    "Falcon Freight SA",
    "Quartz Media Group",
    "Willow Creek Bakery",
    "Ironbridge Engineering",
    "Sunrise Pharmacy",
)
TITLES = (
    "head of sales",
    "software engineer",
    "office manager",
    "data analyst",
    "chief financial officer",
    "marketing director",
    "warehouse supervisor",
    "product designer",
    "customer support lead",
    "accountant",
)
STREETS = (
    "Elm Street",
    "Market Street",
    "Oak Avenue",
    "Station Road",
    "Harbour Lane",
    "King Street",
    "Mill Road",
    "Park Avenue",
    "Church Lane",
    "River Road",
)
#: city, postal code pattern (# = digit), country
CITIES = (
    ("Springfield", "#####", "United States"),
    ("Portland", "#####", "United States"),
    ("Austin", "#####", "United States"),
    ("Leeds", "LS# #AB", "United Kingdom"),
    ("Bristol", "BS# #CD", "United Kingdom"),
    ("Lyon", "69###", "France"),
    ("Munich", "80###", "Germany"),
    ("Hamburg", "20###", "Germany"),
    ("Milan", "20###", "Italy"),
    ("Rotterdam", "30## AB", "Netherlands"),
    ("Krakow", "30-###", "Poland"),
    ("Porto", "4000-###", "Portugal"),
)
#: product, unit, price range
PRODUCTS = (
    ("printer paper", Unit.box, (8, 30)),
    ("USB-C cable", Unit.piece, (5, 25)),
    ("installation service", Unit.hour, (40, 120)),
    ("coffee beans", Unit.kg, (12, 40)),
    ("office chair", Unit.piece, (90, 400)),
    ("staples", Unit.box, (2, 9)),
    ("consulting", Unit.hour, (80, 250)),
    ("rice", Unit.kg, (1, 6)),
    ("monitor", Unit.piece, (120, 600)),
    ("cleaning service", Unit.hour, (20, 60)),
    ("notebooks", Unit.box, (10, 45)),
    ("olive oil", Unit.kg, (6, 20)),
)
UNIT_WORDS = {
    Unit.box: ("box", "boxes"),
    Unit.piece: ("piece", "pieces"),
    Unit.hour: ("hour", "hours"),
    Unit.kg: ("kg", "kg"),
}
CURRENCY_SIGNS = {"USD": "$", "EUR": "€", "GBP": "£"}
MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)

JA_FIRST = ("太郎", "花子", "健", "美咲", "翔太", "結衣", "大輔", "さくら", "直樹", "愛")
JA_LAST = ("田中", "佐藤", "鈴木", "高橋", "山田", "伊藤", "渡辺", "中村", "小林", "加藤")
JA_COMPANIES = (
    "株式会社サクラ電機",
    "山田商事株式会社",
    "株式会社ミドリ商会",
    "東和物産株式会社",
    "株式会社アオバ食品",
    "北斗運輸株式会社",
)
JA_TITLES = ("営業部長", "エンジニア", "経理担当", "総務課長", "デザイナー")
#: prefecture + ward, ward alone, romanised, street, postal code
JA_PLACES = (
    ("東京都", "渋谷区", "Shibuya", "神宮前{a}－{b}－{c}", "１５０－０００１"),
    ("大阪府", "大阪市北区", "Osaka", "梅田{a}－{b}－{c}", "５３０－０００１"),
    ("神奈川県", "横浜市中区", "Yokohama", "山下町{a}－{b}", "２３１－００２３"),
    ("愛知県", "名古屋市中区", "Nagoya", "栄{a}－{b}－{c}", "４６０－０００８"),
)
JA_PRODUCTS = (
    ("コピー用紙", Unit.box, "箱", (800, 3000)),
    ("ケーブル", Unit.piece, "個", (500, 2500)),
    ("設置作業", Unit.hour, "時間", (4000, 12000)),
    ("コーヒー豆", Unit.kg, "キロ", (1500, 5000)),
)


def full_width(text: str) -> str:
    """ASCII digits and a few signs as their full-width forms (１２，５００)."""
    return text.translate(str.maketrans("0123456789,.-:", "０１２３４５６７８９，．－："))


# ------------------------------------------------------------------ English templates


def _date(rng: random.Random) -> dt.date:
    return dt.date(2021, 1, 1) + dt.timedelta(days=rng.randrange(0, 4 * 365))


def _date_text(rng: random.Random, day: dt.date) -> str:
    month = MONTHS[day.month - 1]
    return rng.choice(
        (
            f"{month} {day.day}, {day.year}",
            f"{day.day} {month} {day.year}",
            day.isoformat(),
            f"{month if len(month) <= 4 else month[:3] + '.'} {day.day}, {day.year}",
        )
    )


def _money(rng: random.Random, low: float, high: float) -> float:
    return round(rng.uniform(low, high), rng.choice((0, 2)))


def _amount_text(rng: random.Random, amount: float, currency: str) -> str:
    number = f"{amount:,.2f}" if amount != int(amount) or rng.random() < 0.5 else f"{amount:,.0f}"
    sign = CURRENCY_SIGNS.get(currency)
    forms = [f"{number} {currency}", f"{currency} {number}"]
    if sign:
        forms.append(f"{sign}{number}")
    return rng.choice(forms)


def _postal(rng: random.Random, pattern: str) -> str:
    return "".join(str(rng.randrange(10)) if c == "#" else c for c in pattern)


def payment_en(rng: random.Random) -> tuple[str, dict[str, Any]]:
    payer = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    company = rng.choice(COMPANIES)
    day = _date(rng)
    currency = rng.choice(("USD", "EUR", "GBP"))
    amount = _money(rng, 20, 9000)
    when, how_much = _date_text(rng, day), _amount_text(rng, amount, currency)
    text = rng.choice(
        (
            f"On {when}, {payer} paid {how_much} to {company}.",
            f"{company} received a payment of {how_much} from {payer} on {when}.",
            f"Receipt: {payer} transferred {how_much} to {company} ({when}).",
            f"Payment confirmed. Payer: {payer}. Payee: {company}. Date: {when}. "
            f"Amount: {how_much}.",
            f"Thanks to {payer} for the {how_much} paid to {company} on {when}.",
        )
    )
    truth = {
        "payer": payer,
        "company": company,
        "date": day.isoformat(),
        "amount": amount,
        "currency": currency,
    }
    return text, truth


def hire_en(rng: random.Random) -> tuple[str, dict[str, Any]]:
    first, last = rng.choice(FIRST), rng.choice(LAST)
    title, company = rng.choice(TITLES), rng.choice(COMPANIES)
    city, postal_pattern, country = rng.choice(CITIES)
    street = f"{rng.randrange(1, 250)} {rng.choice(STREETS)}"
    postal = _postal(rng, postal_pattern)
    day = _date(rng)
    when = _date_text(rng, day)
    address = f"{street}, {postal} {city}, {country}"
    text = rng.choice(
        (
            f"{first} {last} joined {company} as {title} on {when}. "
            f"The company is located at {address}.",
            f"{company} ({address}) welcomes {first} {last}, our new {title}, starting {when}.",
            f"New hire: {first} {last}, {title}. Employer: {company}, {address}. "
            f"Start date: {when}.",
            f"Starting {when}, {first} {last} works as {title} at {company}, "
            f"whose office is at {address}.",
        )
    )
    truth = {
        "person": {"first_name": first, "last_name": last},
        "job_title": title,
        "company": {
            "name": company,
            "address": {
                "street": street,
                "city": city,
                "postal_code": postal,
                "country": country,
            },
        },
        "start_date": day.isoformat(),
    }
    return text, truth


def _line_en(rng: random.Random, product: tuple, currency: str) -> tuple[str, dict[str, Any]]:
    name, unit, (low, high) = product
    quantity = rng.randrange(1, 40)
    price = _money(rng, low, high)
    unit_word = UNIT_WORDS[unit][quantity != 1]
    price_text = f"{price:,.2f}"
    text = rng.choice(
        (
            f"{quantity} {unit_word} of {name} at {price_text} per {UNIT_WORDS[unit][0]}",
            f"{name}: {quantity} {unit_word}, {price_text} each",
        )
    )
    line = {"product": name, "quantity": quantity, "unit": unit.value, "unit_price": price}
    return text, line


def order_en(rng: random.Random) -> tuple[str, dict[str, Any]]:
    order_id = f"{rng.choice(('PO', 'ORD', 'SO'))}-{rng.randrange(1000, 99999)}"
    customer = rng.choice(COMPANIES)
    day = _date(rng)
    currency = rng.choice(("USD", "EUR", "GBP"))
    products = rng.sample(PRODUCTS, rng.randrange(1, 5))
    lines = [_line_en(rng, p, currency) for p in products]
    items = "; ".join(text for text, _ in lines)
    when = _date_text(rng, day)
    text = rng.choice(
        (
            f"Order {order_id} from {customer}, dated {when}, prices in {currency}: {items}.",
            f"{customer} placed order {order_id} on {when} (currency {currency}). Items: {items}.",
            f"Purchase order {order_id}. Customer: {customer}. Date: {when}. "
            f"Currency: {currency}. Lines: {items}.",
        )
    )
    truth = {
        "order_id": order_id,
        "customer": customer,
        "order_date": day.isoformat(),
        "currency": currency,
        "lines": [line for _, line in lines],
    }
    return text, truth


# ------------------------------------------------------------------ Japanese templates


def _date_ja(day: dt.date) -> str:
    return (
        full_width(f"{day.year}")
        + "年"
        + full_width(f"{day.month}")
        + "月"
        + full_width(f"{day.day}")
        + "日"
    )


def payment_ja(rng: random.Random) -> tuple[str, dict[str, Any]]:
    last, first = rng.choice(JA_LAST), rng.choice(JA_FIRST)
    company = rng.choice(JA_COMPANIES)
    day = _date(rng)
    amount = float(rng.randrange(10, 2000) * 100)
    yen = full_width(f"{amount:,.0f}")
    text = rng.choice(
        (
            f"{_date_ja(day)}、{last}{first}さんが{company}に{yen}円を支払いました。",
            f"{company}は{_date_ja(day)}に{last} {first}様から{yen}円の入金を受けました。",
        )
    )
    truth = {
        "payer": Accept((f"{last}{first}", f"{last} {first}")),
        "company": company,
        "date": day.isoformat(),
        "amount": amount,
        "currency": "JPY",
    }
    return text, truth


def hire_ja(rng: random.Random) -> tuple[str, dict[str, Any]]:
    last, first = rng.choice(JA_LAST), rng.choice(JA_FIRST)
    title, company = rng.choice(JA_TITLES), rng.choice(JA_COMPANIES)
    prefecture, ward, roman, street_pattern, postal = rng.choice(JA_PLACES)
    numbers = {k: full_width(str(rng.randrange(1, 20))) for k in "abc"}
    street = street_pattern.format(**numbers)
    day = _date(rng)
    text = (
        f"{last}{first}さんは{_date_ja(day)}に{title}として{company}に入社しました。"
        f"本社所在地は〒{postal} {prefecture}{ward}{street}です。"
    )
    truth = {
        "person": {"first_name": first, "last_name": last},
        "job_title": title,
        "company": {
            "name": company,
            "address": {
                "street": street,
                "city": Accept((ward, prefecture + ward, roman)),
                "postal_code": postal,
                "country": Accept(("日本", "Japan")),
            },
        },
        "start_date": day.isoformat(),
    }
    return text, truth


def order_ja(rng: random.Random) -> tuple[str, dict[str, Any]]:
    order_id = f"PO-{rng.randrange(1000, 99999)}"
    customer = rng.choice(JA_COMPANIES)
    day = _date(rng)
    chosen = rng.sample(JA_PRODUCTS, rng.randrange(1, 4))
    lines, items = [], []
    for name, unit, counter, (low, high) in chosen:
        quantity = rng.randrange(1, 30)
        price = float(rng.randrange(low, high, 10))
        items.append(
            f"{name} {full_width(str(quantity))}{counter}（単価{full_width(f'{price:,.0f}')}円）"
        )
        line = {"product": name, "quantity": quantity, "unit": unit.value, "unit_price": price}
        lines.append(line)
    text = (
        f"注文番号{full_width(order_id)}、{customer}、{_date_ja(day)}、通貨JPY："
        + "、".join(items)
        + "。"
    )
    truth = {
        "order_id": order_id,
        "customer": customer,
        "order_date": day.isoformat(),
        "currency": "JPY",
        "lines": lines,
    }
    return text, truth


Template = Callable[[random.Random], tuple[str, dict[str, Any]]]
TEMPLATES: dict[tuple[str, str], Template] = {
    ("flat", "en"): payment_en,
    ("flat", "ja"): payment_ja,
    ("nested", "en"): hire_en,
    ("nested", "ja"): hire_ja,
    ("list", "en"): order_en,
    ("list", "ja"): order_ja,
}


def generate_cases(per_schema: int = 80, ja_share: float = 0.15, seed: int = 16) -> list[Case]:
    """``per_schema`` cases for each model, ``ja_share`` of them Japanese; same seed, same cases."""
    cases: list[Case] = []
    n_ja = round(per_schema * ja_share)
    for schema in MODELS:
        rng = random.Random(f"{seed}-{schema}")
        for i in range(per_schema):
            lang = "ja" if i >= per_schema - n_ja else "en"
            text, truth = TEMPLATES[(schema, lang)](rng)
            cases.append(Case(f"{schema}-{lang}-{i:03d}", schema, lang, text, truth))
    return cases


# ------------------------------------------------------------------ scoring


def normalise(value: Any) -> Any:
    """Strings: NFKC, case-folded, no whitespace, no trailing punctuation; numbers as float."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        text = "".join(unicodedata.normalize("NFKC", value).casefold().split())
        return text.rstrip(".,;:。、")
    return value


def _leaf_equal(truth: Any, got: Any) -> bool:
    if isinstance(truth, Accept):
        return any(_leaf_equal(t, got) for t in truth.values)
    t, g = normalise(truth), normalise(got)
    if isinstance(t, float):
        return (
            isinstance(g, float) and not isinstance(got, bool) and math.isclose(t, g, abs_tol=5e-3)
        )
    return t == g


def leaf_count(truth: Any) -> int:
    """Leaf fields of a truth value (an object's, a list's items', or 1)."""
    if isinstance(truth, dict):
        return sum(leaf_count(v) for v in truth.values())
    if isinstance(truth, list):
        return sum(leaf_count(v) for v in truth)
    return 1


def score(truth: Any, got: Any) -> tuple[int, int]:
    """(correct leaf fields, fields counted): missing or extra list items count as wrong."""
    if isinstance(truth, dict):
        pairs = [score(v, got.get(k) if isinstance(got, dict) else None) for k, v in truth.items()]
        return sum(c for c, _ in pairs), sum(n for _, n in pairs)
    if isinstance(truth, list):
        items = got if isinstance(got, list) else []
        pairs = [score(t, items[i] if i < len(items) else None) for i, t in enumerate(truth)]
        extra = len(items) - len(truth)
        per_item = leaf_count(truth[0]) if truth else 1
        wrong = per_item * max(extra, 0)
        return sum(c for c, _ in pairs), sum(n for _, n in pairs) + wrong
    return int(_leaf_equal(truth, got)), 1


#: English cases per model in the integration test's subset (`integration_subset`)
SUBSET_PER_SCHEMA = 8


def integration_subset() -> list[Case]:
    """The first English cases of each model: what tests/integration sends on every run."""
    subset: list[Case] = []
    for schema in MODELS:
        english = [c for c in generate_cases() if c.schema == schema and c.lang == "en"]
        subset += english[:SUBSET_PER_SCHEMA]
    return subset
