"""The general SlimSet pool: a seeded generator of a few thousand unique prompts for SD-class models.

Ten domains (people, animals, objects, food, indoor, outdoor, vehicles, art_styles, text_rendering,
multi_object), each filled from templates and vocabulary written here. The same seed gives the same
pool on every machine (``random.Random``). The pool is clean: no exact duplicates (case-insensitive).

    python -m slimdiff.pipeline.prompt_pool --out data/prompts/general_pool.csv
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
from pathlib import Path
from typing import Callable, Sequence

DEFAULT_PER_DOMAIN = 350

DEFAULT_SEED = 0

PHOTO = ["a photo of", "a close-up photo of", "a candid photo of", "a studio photo of", "a wide-angle photo of",
         "a black and white photo of", "a film photograph of", "a high-resolution photo of", "a snapshot of",
         "a professional photograph of"]

LIGHT = ["in soft morning light", "at golden hour", "under harsh midday sun", "at dusk", "at night under streetlights",
         "in overcast light", "lit by a single window", "in dramatic side lighting", "in warm candlelight",
         "under neon lights", "in foggy weather", "on a rainy day", "in the snow", "backlit by the sunset"]

COLOURS = ["red", "blue", "green", "yellow", "orange", "purple", "pink", "white", "black", "brown", "grey",
           "turquoise", "golden", "silver", "teal", "maroon", "beige", "navy blue"]

MATERIALS = ["wooden", "ceramic", "glass", "metal", "leather", "plastic", "marble", "woven", "copper", "stone",
             "porcelain", "brass", "cast iron", "bamboo", "velvet"]

SIZES = ["small", "large", "tiny", "huge", "tall", "short", "round", "square"]

PEOPLE = ["a young woman", "an old man", "a little girl", "a teenage boy", "an elderly woman", "a middle-aged man",
          "a toddler", "a young man", "a grandmother", "a grandfather", "two friends", "a group of students",
          "a family of four", "a couple", "a woman in her thirties", "a man with a beard", "a woman with curly hair",
          "a boy with glasses", "a girl with freckles", "a bald man"]

PROFESSIONS = ["a chef", "a firefighter", "a nurse", "a carpenter", "a farmer", "a pilot", "a teacher",
               "a mechanic", "a scientist", "a baker", "a fisherman", "a painter", "a musician", "a doctor",
               "a potter", "a gardener", "a tailor", "a barista", "a librarian", "an astronaut"]

ACTIVITIES = ["reading a book", "riding a bicycle", "playing the guitar", "cooking dinner", "laughing",
              "walking a dog", "drinking coffee", "painting on a canvas", "dancing", "running in a park",
              "typing on a laptop", "looking out of a window", "holding an umbrella", "playing chess",
              "taking a selfie", "carrying groceries", "sitting on a bench", "swimming in a lake",
              "writing in a notebook", "fixing a bicycle", "feeding pigeons", "skateboarding", "meditating",
              "climbing a rock wall", "planting flowers"]

CLOTHES = ["a red scarf", "a denim jacket", "a yellow raincoat", "a business suit", "a knitted sweater",
           "a straw hat", "a leather jacket", "a summer dress", "a hoodie", "a wool coat", "a striped shirt",
           "overalls", "a white apron", "a baseball cap", "a traditional kimono", "a sari", "a tuxedo"]

PLACES_FOR_PEOPLE = ["in a busy street", "in a kitchen", "on a beach", "in a library", "in a workshop",
                     "in a field of sunflowers", "at a train station", "in a cafe", "on a rooftop", "in a forest",
                     "in a classroom", "at a market", "in a garden", "on a mountain trail", "in an office"]

EXPRESSIONS = ["smiling", "laughing", "looking thoughtful", "with a serious expression", "looking surprised",
               "with eyes closed", "looking at the camera", "looking away"]

ANIMALS = ["a golden retriever", "a tabby cat", "a red fox", "a brown bear", "an owl", "a horse", "a rabbit",
           "a squirrel", "an elephant", "a giraffe", "a zebra", "a lion", "a tiger", "a penguin", "a dolphin",
           "a sea turtle", "a parrot", "a hummingbird", "a frog", "a butterfly", "a hedgehog", "a panda",
           "a koala", "a kangaroo", "a wolf", "a deer", "a cow", "a sheep", "a goat", "a duck", "a swan",
           "a flamingo", "a chameleon", "an octopus", "a jellyfish", "a husky", "a dachshund", "a black cat",
           "a barn owl", "a peacock", "a camel", "a raccoon", "an otter", "a seal", "a crab"]

ANIMAL_ACTIONS = ["sleeping", "running", "eating", "jumping", "swimming", "sitting", "playing", "yawning",
                  "looking at the camera", "hiding", "stretching", "drinking water", "walking", "resting"]

HABITATS = ["in a meadow", "in the snow", "on a tree branch", "in shallow water", "in tall grass", "on a rock",
            "in a forest clearing", "on a sandy beach", "in the desert", "under a bush", "on a wooden fence",
            "near a river", "in a barn", "on a windowsill", "in a coral reef", "on a sofa"]

BABY = ["a puppy", "a kitten", "a baby elephant", "a foal", "a duckling", "a lamb", "a bear cub", "a piglet",
        "a fawn", "a baby penguin"]

OBJECTS = ["teapot", "vase", "lamp", "chair", "clock", "backpack", "guitar", "camera", "umbrella", "bicycle helmet",
           "wristwatch", "pair of sneakers", "coffee mug", "bowl", "candle", "book", "key", "pair of glasses",
           "typewriter", "radio", "globe", "telescope", "violin", "hourglass", "lantern", "suitcase", "kettle",
           "pair of scissors", "hammer", "fountain pen", "notebook", "headphones", "rubber duck", "teddy bear",
           "chess board", "compass", "jar", "basket", "mirror", "sculpture"]

SURFACES = ["on a wooden table", "on a white background", "on a marble countertop", "on a windowsill",
            "on a desk", "on a shelf", "on the grass", "on a bed of moss", "on a velvet cloth", "on a kitchen counter",
            "in a shop window", "on a concrete floor", "on sand", "floating in the air"]

DISHES = ["a bowl of ramen", "a slice of pepperoni pizza", "a stack of pancakes with syrup", "a cheeseburger",
          "a plate of sushi", "a croissant", "a bowl of fruit salad", "a chocolate cake", "a cup of cappuccino",
          "a plate of spaghetti", "a taco", "a bowl of tomato soup", "a loaf of sourdough bread", "a cupcake",
          "a green salad", "a plate of dumplings", "a bowl of curry with rice", "a glass of orange juice",
          "a cheese platter", "a strawberry tart", "a bagel with cream cheese", "a bowl of porridge",
          "a grilled steak", "a plate of fried eggs and bacon", "a bowl of cherries", "a pot of stew",
          "a smoothie bowl", "a falafel wrap", "a plate of macarons", "an ice cream cone", "a bowl of pho",
          "a paella", "a pumpkin pie", "a plate of tacos", "a burrito", "a bowl of popcorn", "a cup of green tea",
          "a waffle with berries", "a lemon", "a basket of apples"]

FOOD_SETTINGS = ["on a rustic wooden table", "on a white plate", "in a restaurant", "on a picnic blanket",
                 "on a kitchen counter", "at a street food stall", "on a slate board", "in a bakery window",
                 "on a dinner table with candles", "on a cafe table"]

FOOD_STYLES = ["food photography", "overhead shot", "close-up", "shallow depth of field", "steam rising",
               "with fresh herbs", "studio lighting", "appetizing", "natural light", "macro shot"]

ROOMS = ["living room", "kitchen", "bedroom", "bathroom", "library", "office", "classroom", "cafe", "restaurant",
         "museum hall", "hotel lobby", "greenhouse", "workshop", "art studio", "train station hall", "gym",
         "laundromat", "attic", "basement", "hospital corridor", "bookshop", "cathedral interior", "theater",
         "concert hall", "supermarket aisle", "children's playroom", "music studio", "barbershop"]

ROOM_STYLES = ["cozy", "modern", "minimalist", "rustic", "victorian", "industrial", "scandinavian", "messy",
               "empty", "bright", "dimly lit", "luxurious", "abandoned", "futuristic", "bohemian"]

ROOM_DETAILS = ["with large windows", "with a fireplace", "with plants everywhere", "with wooden floors",
                "with a high ceiling", "with bookshelves", "with a red sofa", "with string lights",
                "with a checkered floor", "with exposed brick walls", "with sunlight streaming in",
                "with a chandelier", "with a view of the city"]

LANDSCAPES = ["a mountain lake", "a snowy mountain range", "a desert with sand dunes", "a tropical beach",
              "a rocky coastline", "a waterfall in a jungle", "a field of lavender", "a pine forest",
              "a canyon", "a rice terrace", "a glacier", "a volcano", "a rolling green hill", "a frozen lake",
              "a bamboo forest", "a wheat field", "a coral reef", "a foggy valley", "a river delta", "a savanna"]

CITYSCAPES = ["a busy city street", "a quiet village square", "a harbor with fishing boats", "a skyline",
              "a narrow alley", "a bridge over a river", "a market square", "a suburban street",
              "a lighthouse on a cliff", "a castle on a hill", "a train crossing a viaduct", "a park with a fountain",
              "a medieval town", "a modern plaza", "a farmhouse", "a windmill", "a gas station on an empty road",
              "a pier", "an old temple", "a football stadium"]

TIMES = ["at sunrise", "at sunset", "at night", "under a starry sky", "in autumn", "in winter", "in spring",
         "in summer", "after the rain", "in thick fog", "during a thunderstorm", "under a full moon",
         "on a clear day", "at blue hour"]

VIEWS = ["aerial view", "wide shot", "panorama", "seen from a distance", "long exposure", "drone shot",
         "landscape photography", "tilt-shift", "reflections in the water", "dramatic clouds"]

VEHICLES = ["car", "vintage car", "sports car", "pickup truck", "bus", "double-decker bus", "tram",
            "steam locomotive", "bullet train", "motorcycle", "scooter", "bicycle", "sailboat", "fishing boat",
            "cargo ship", "canoe", "hot air balloon", "airplane", "helicopter", "fire truck", "ambulance",
            "taxi", "tractor", "camper van", "submarine", "rocket", "jeep", "delivery van", "rowing boat",
            "cable car"]

VEHICLE_PLACES = ["parked on a city street", "driving along a coastal road", "on a dirt road", "in a garage",
                  "crossing a bridge", "at a railway station", "in a harbor", "in the desert",
                  "on a snowy mountain pass", "in a field", "at a gas station", "flying over the clouds",
                  "on a race track", "in a museum", "in the rain", "on a country lane"]

STYLES = ["a watercolor painting", "an oil painting", "a pencil sketch", "a charcoal drawing", "an ink drawing",
          "a woodblock print", "a pixel art image", "a low-poly 3D render", "a claymation still",
          "a stained glass window", "a mosaic", "a pop art poster", "a vintage travel poster", "an anime illustration",
          "a comic book panel", "a children's book illustration", "a paper cut-out collage", "an impressionist painting",
          "a cubist painting", "a surrealist painting", "an art nouveau illustration", "a baroque painting",
          "a renaissance fresco", "an ukiyo-e print", "a graffiti mural", "a linocut print", "a pastel drawing",
          "a digital painting", "a vector illustration", "an isometric illustration", "a blueprint drawing",
          "an embroidery", "a cave painting", "a minimalist line drawing", "a synthwave illustration"]

STYLE_SUBJECTS = ["a lighthouse", "a cat", "a city at night", "a bowl of fruit", "a sailing ship", "a fox in a forest",
                  "a portrait of a woman", "a mountain village", "a dragon", "a robot", "a tree in autumn",
                  "a train station", "a horse", "a garden with a pond", "a cup of tea", "an owl", "a street market",
                  "a castle", "a musician", "a whale", "a bicycle", "a field of flowers", "a rainy street",
                  "an astronaut", "a mushroom forest"]

STYLE_PALETTES = ["in muted colors", "in vivid colors", "in black and white", "in pastel colors",
                  "with bold outlines", "with a limited palette", "with visible brush strokes", "in warm tones",
                  "in cool blue tones", "highly detailed"]

SIGN_TEXTS = ["OPEN", "CLOSED", "SALE", "WELCOME", "EXIT", "HELLO", "COFFEE", "STOP", "HOTEL", "BAKERY",
              "NO PARKING", "FRESH FISH", "BOOKS", "PHARMACY", "LIVE MUSIC", "THANK YOU", "GAME OVER", "LOVE",
              "DINER", "PIZZA", "TAXI", "GARAGE", "FOR RENT", "SLOW DOWN", "GOOD MORNING", "HAPPY BIRTHDAY",
              "DANGER", "ICE CREAM", "CINEMA", "ARCADE", "MOTEL", "BAR", "JAZZ", "GELATO", "TICKETS"]

TEXT_CARRIERS = ["a neon sign that says", "a wooden sign that reads", "a chalkboard that says",
                 "a storefront with a sign that says", "a cake with icing that spells", "a T-shirt printed with",
                 "a coffee cup with the word", "a street sign that reads", "a banner that says",
                 "a book cover titled", "a movie poster titled", "a billboard that says", "a license plate that reads",
                 "a hand-written note that says", "a mug with the word", "a road painted with the word",
                 "a sticker that says", "a doormat that says", "a tattoo of the word", "a sand drawing of the word",
                 "a vintage poster with the headline", "a graffiti wall that says", "a birthday card that says",
                 "a letterboard that says", "a cookie decorated with the word"]

TEXT_STYLES = ["", "", "in bold letters", "in cursive handwriting", "in red letters", "in gold letters",
               "in glowing letters", "in a retro font", "in block capitals", "at night", "in the rain",
               "close-up"]

COUNTABLE = ["apple", "orange", "cup", "book", "cat", "dog", "ball", "candle", "bottle", "chair", "bird", "flower",
             "balloon", "banana", "pencil", "shoe", "clock", "vase", "toy car", "teddy bear", "plate", "hat",
             "pumpkin", "lemon", "duck"]

NUMBERS = ["two", "three", "four", "five"]

RELATIONS = ["to the left of", "to the right of", "on top of", "under", "next to", "behind", "in front of",
             "inside", "beside", "leaning against"]


def _a(word: str) -> str:
    """``word`` with its indefinite article."""
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _plural(word: str) -> str:
    if word.endswith(("s", "sh", "ch")):
        return word + "es"
    if word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    if word == "shoe":
        return "shoes"
    return word + "s"


Template = Callable[[random.Random], str]


def _c(rng: random.Random, items: Sequence[str]) -> str:
    return rng.choice(items)


PEOPLE_TEMPLATES: list[Template] = [
    lambda r: f"{_c(r, PHOTO)} {_c(r, PEOPLE)} {_c(r, ACTIVITIES)} {_c(r, PLACES_FOR_PEOPLE)}",
    lambda r: f"a portrait of {_c(r, PEOPLE)} wearing {_c(r, CLOTHES)}, {_c(r, EXPRESSIONS)}, {_c(r, LIGHT)}",
    lambda r: f"{_c(r, PROFESSIONS)} at work {_c(r, PLACES_FOR_PEOPLE)}, {_c(r, LIGHT)}",
    lambda r: f"{_c(r, PHOTO)} {_c(r, PROFESSIONS)} {_c(r, ACTIVITIES)}",
    lambda r: f"{_c(r, PEOPLE)} wearing {_c(r, CLOTHES)} {_c(r, ACTIVITIES)}",
]

ANIMAL_TEMPLATES: list[Template] = [
    lambda r: f"{_c(r, PHOTO)} {_c(r, ANIMALS)} {_c(r, ANIMAL_ACTIONS)} {_c(r, HABITATS)}",
    lambda r: f"{_c(r, ANIMALS)} {_c(r, HABITATS)} {_c(r, LIGHT)}",
    lambda r: f"a wildlife photograph of {_c(r, ANIMALS)} {_c(r, ANIMAL_ACTIONS)}, telephoto lens",
    lambda r: f"{_c(r, BABY)} {_c(r, ANIMAL_ACTIONS)} {_c(r, HABITATS)}",
    lambda r: f"a close-up of the face of {_c(r, ANIMALS)}, detailed fur and eyes",
]

OBJECT_TEMPLATES: list[Template] = [
    lambda r: f"{_c(r, PHOTO)} {_a(_c(r, COLOURS))} {_c(r, MATERIALS)} {_c(r, OBJECTS)} {_c(r, SURFACES)}",
    lambda r: f"{_a(_c(r, SIZES))} {_c(r, MATERIALS)} {_c(r, OBJECTS)} {_c(r, SURFACES)}, {_c(r, LIGHT)}",
    lambda r: f"a product photo of {_a(_c(r, COLOURS))} {_c(r, OBJECTS)} on a white background",
    lambda r: f"an old {_c(r, OBJECTS)} covered in dust {_c(r, SURFACES)}",
    lambda r: f"{_a(_c(r, OBJECTS))} made of {_c(r, MATERIALS).replace('wooden', 'wood').replace('woven', 'wicker')}",
]

FOOD_TEMPLATES: list[Template] = [
    lambda r: f"{_c(r, DISHES)} {_c(r, FOOD_SETTINGS)}, {_c(r, FOOD_STYLES)}",
    lambda r: f"{_c(r, PHOTO)} {_c(r, DISHES)} {_c(r, FOOD_SETTINGS)}",
    lambda r: f"{_c(r, DISHES)}, {_c(r, FOOD_STYLES)}, {_c(r, LIGHT)}",
    lambda r: f"{_c(r, DISHES)} and {_c(r, DISHES)} {_c(r, FOOD_SETTINGS)}",
]

INDOOR_TEMPLATES: list[Template] = [
    lambda r: f"{_a(_c(r, ROOM_STYLES))} {_c(r, ROOMS)} {_c(r, ROOM_DETAILS)}",
    lambda r: f"the interior of {_a(_c(r, ROOM_STYLES))} {_c(r, ROOMS)}, {_c(r, LIGHT)}",
    lambda r: f"{_c(r, PHOTO)} {_a(_c(r, ROOM_STYLES))} {_c(r, ROOMS)} {_c(r, ROOM_DETAILS)}, interior design",
    lambda r: f"an empty {_c(r, ROOMS)} {_c(r, TIMES)}, {_c(r, ROOM_DETAILS)}",
]

OUTDOOR_TEMPLATES: list[Template] = [
    lambda r: f"{_c(r, LANDSCAPES)} {_c(r, TIMES)}, {_c(r, VIEWS)}",
    lambda r: f"{_c(r, CITYSCAPES)} {_c(r, TIMES)}",
    lambda r: f"{_c(r, PHOTO)} {_c(r, CITYSCAPES)} {_c(r, TIMES)}, {_c(r, VIEWS)}",
    lambda r: f"{_c(r, PHOTO)} {_c(r, LANDSCAPES)} {_c(r, LIGHT)}",
]

VEHICLE_TEMPLATES: list[Template] = [
    lambda r: f"{_a(_c(r, COLOURS))} {_c(r, VEHICLES)} {_c(r, VEHICLE_PLACES)}",
    lambda r: f"{_c(r, PHOTO)} {_a(_c(r, COLOURS))} {_c(r, VEHICLES)} {_c(r, VEHICLE_PLACES)}, {_c(r, LIGHT)}",
    lambda r: f"an old rusty {_c(r, VEHICLES)} {_c(r, VEHICLE_PLACES)}",
    lambda r: f"a toy model of {_a(_c(r, VEHICLES))} {_c(r, SURFACES)}",
]

STYLE_TEMPLATES: list[Template] = [
    lambda r: f"{_c(r, STYLES)} of {_c(r, STYLE_SUBJECTS)}",
    lambda r: f"{_c(r, STYLES)} of {_c(r, STYLE_SUBJECTS)} {_c(r, STYLE_PALETTES)}",
    lambda r: f"{_c(r, STYLE_SUBJECTS)} as {_c(r, STYLES)}, {_c(r, STYLE_PALETTES)}",
    lambda r: f"{_c(r, STYLE_SUBJECTS)} in the style of {_c(r, STYLES)}",
]


def _text_prompt(r: random.Random) -> str:
    style = _c(r, TEXT_STYLES)
    return f"{_c(r, TEXT_CARRIERS)} \"{_c(r, SIGN_TEXTS)}\"" + (f", {style}" if style else "")


LETTERING = ["chalk", "neon", "sand", "frosting", "smoke", "graffiti", "gold leaf", "wooden letters", "ice", "flowers"]

SHOPS = ["shop", "diner", "motel", "bar", "bakery", "bookstore"]

TEXT_TEMPLATES: list[Template] = [
    _text_prompt,
    lambda r: f"the word \"{_c(r, SIGN_TEXTS)}\" written in {_c(r, LETTERING)}",
    lambda r: f"a photo of a {_c(r, SHOPS)} with a {_c(r, COLOURS)} sign that says \"{_c(r, SIGN_TEXTS)}\"",
]


def _counting(r: random.Random) -> str:
    return f"{_c(r, NUMBERS)} {_plural(_c(r, COUNTABLE))} {_c(r, SURFACES)}"


def _relation(r: random.Random) -> str:
    first, second = r.sample(COUNTABLE, 2)
    return f"{_a(_c(r, COLOURS))} {first} {_c(r, RELATIONS)} {_a(_c(r, COLOURS))} {second}"


def _binding(r: random.Random) -> str:
    first, second = r.sample(COUNTABLE, 2)
    colour_1, colour_2 = r.sample(COLOURS, 2)
    return f"{_a(colour_1)} {first} and {_a(colour_2)} {second} {_c(r, SURFACES)}"


def _scene_mix(r: random.Random) -> str:
    animal, person = _c(r, ANIMALS), _c(r, PEOPLE)
    return f"{person} and {animal} {_c(r, PLACES_FOR_PEOPLE)}, with {_a(_c(r, VEHICLES))} in the background"


MULTI_TEMPLATES: list[Template] = [_counting, _relation, _binding, _scene_mix,
                                   lambda r: f"{_c(r, NUMBERS)} {_plural(_c(r, COUNTABLE))} and {_a(_c(r, COUNTABLE))} {_c(r, SURFACES)}"]

DOMAINS: dict[str, list[Template]] = {
    "people": PEOPLE_TEMPLATES,
    "animals": ANIMAL_TEMPLATES,
    "objects": OBJECT_TEMPLATES,
    "food": FOOD_TEMPLATES,
    "indoor": INDOOR_TEMPLATES,
    "outdoor": OUTDOOR_TEMPLATES,
    "vehicles": VEHICLE_TEMPLATES,
    "art_styles": STYLE_TEMPLATES,
    "text_rendering": TEXT_TEMPLATES,
    "multi_object": MULTI_TEMPLATES,
}


def _tidy(text: str) -> str:
    """One space between words, none before commas."""
    return " ".join(text.split()).replace(" ,", ",")


def generate_pool(per_domain: int = DEFAULT_PER_DOMAIN, seed: int = DEFAULT_SEED) -> list[tuple[str, str]]:
    """``per_domain`` unique prompts per domain as (prompt, domain) rows, domain by domain.

    Each domain draws from its own ``random.Random(f"{seed}:{domain}")`` so domains are independent.
    Uniqueness is case-insensitive over the whole pool. Fails if a domain's templates cannot give
    ``per_domain`` distinct prompts.
    """
    if per_domain < 1:
        raise ValueError(f"per_domain must be positive, got {per_domain}")
    seen: set[str] = set()
    rows: list[tuple[str, str]] = []
    for domain, templates in DOMAINS.items():
        rng = random.Random(f"{seed}:{domain}")
        made, tries = 0, 0
        while made < per_domain:
            tries += 1
            if tries > 200 * per_domain:
                raise ValueError(f"domain {domain!r} gave only {made} distinct prompts of {per_domain} requested")
            prompt = _tidy(rng.choice(templates)(rng))
            key = prompt.casefold()
            if key in seen:
                continue
            seen.add(key)
            rows.append((prompt, domain))
            made += 1
    return rows


def write_pool(rows: Sequence[tuple[str, str]], path: str | Path) -> Path:
    """Write the pool as CSV with columns prompt, domain (atomically)."""
    from slimdiff.files import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["prompt", "domain"])
            writer.writerows(rows)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slimdiff.pipeline.prompt_pool", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="CSV file to write (columns prompt, domain)")
    parser.add_argument("--per-domain", type=int, default=DEFAULT_PER_DOMAIN, help=f"prompts per domain (default {DEFAULT_PER_DOMAIN})")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)
    try:
        rows = generate_pool(args.per_domain, args.seed)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    path = write_pool(rows, args.out)
    print(f"{path}: {len(rows)} prompts in {len(DOMAINS)} domains")
    return 0


if __name__ == "__main__":
    sys.exit(main())
