"""The kernel's logo — an event loop with a message arriving — drawn once, written as SVG and PNG.

    python -m kernel_demo.logo     # rewrites kernel_demo/resources/logo-{svg.svg,32x32.png,64x64.png}

The shapes are defined here once, on a 64 x 64 grid; the SVG is written from them and the PNGs are
drawn from them with Pillow (the ``examples`` extra), four times larger and scaled down, for smooth
edges. The kernelspec installer copies the files from ``resources/``.
"""

from __future__ import annotations

import math
import os

RESOURCES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "resources")
FILES = ("logo-svg.svg", "logo-32x32.png", "logo-64x64.png")

BACKGROUND, LOOP, MESSAGE = "#243b53", "#ffffff", "#f6a623"
CORNER = 12                      # the rounded square 0..64
CENTER, RADIUS, STROKE = 32, 17, 6
GAP = 40                         # degrees either side of 3 o'clock left open in the loop
DOT = 7                          # the message, in the gap


def _point(degrees: float) -> tuple[float, float]:
    """A point on the loop; degrees clockwise from 3 o'clock (as SVG and Pillow both measure)."""
    return CENTER + RADIUS * math.cos(math.radians(degrees)), CENTER + RADIUS * math.sin(math.radians(degrees))


def svg() -> str:
    (x1, y1), (x2, y2) = _point(GAP), _point(360 - GAP)
    return (
        '<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64" viewBox="0 0 64 64">\n'
        f'  <rect width="64" height="64" rx="{CORNER}" fill="{BACKGROUND}"/>\n'
        f'  <path d="M {x1:.2f} {y1:.2f} A {RADIUS} {RADIUS} 0 1 1 {x2:.2f} {y2:.2f}" fill="none" '
        f'stroke="{LOOP}" stroke-width="{STROKE}" stroke-linecap="round"/>\n'
        f'  <circle cx="{CENTER + RADIUS}" cy="{CENTER}" r="{DOT}" fill="{MESSAGE}"/>\n'
        "</svg>\n"
    )


def png(size: int) -> bytes:
    import io

    from PIL import Image, ImageDraw

    scale = size * 4 / 64
    image = Image.new("RGBA", (size * 4, size * 4), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)

    def circle(x: float, y: float, r: float, fill: str) -> None:
        draw.ellipse([(x - r) * scale, (y - r) * scale, (x + r) * scale, (y + r) * scale], fill=fill)

    draw.rounded_rectangle([0, 0, size * 4 - 1, size * 4 - 1], radius=CORNER * scale, fill=BACKGROUND)
    outer = RADIUS + STROKE / 2  # Pillow's arc width grows inwards from its box
    box = [(CENTER - outer) * scale, (CENTER - outer) * scale, (CENTER + outer) * scale, (CENTER + outer) * scale]
    draw.arc(box, GAP, 360 - GAP, fill=LOOP, width=round(STROKE * scale))
    for end in (GAP, 360 - GAP):  # round caps, as the SVG's
        circle(*_point(end), STROKE / 2, LOOP)
    circle(CENTER + RADIUS, CENTER, DOT, MESSAGE)
    out = io.BytesIO()
    image.resize((size, size), Image.Resampling.LANCZOS).save(out, "PNG", optimize=True)
    return out.getvalue()


def main() -> None:
    os.makedirs(RESOURCES, exist_ok=True)
    with open(os.path.join(RESOURCES, "logo-svg.svg"), "w") as f:
        f.write(svg())
    for size in (32, 64):
        with open(os.path.join(RESOURCES, f"logo-{size}x{size}.png"), "wb") as f:
            f.write(png(size))


if __name__ == "__main__":
    main()
