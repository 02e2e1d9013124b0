// SEGA: while sampling, draws on the SEGA node that samples (SEGA KSampler, SEGA Guider, SEGA
// Apply, SEGA Photo Edit, SEGA Photo Guider) where each concept acts at the current step: the positions its threshold keeps (white),
// one tile per concept, labelled. The server sends them as event "sega.masks".
// Canvas only: adds no widget and nothing to saved prompts; labels are drawn as text (fillText).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODES = new Set(["SEGAKSampler", "SEGAGuider", "SEGAApply", "SEGAPhotoEdit", "SEGAPhotoGuider"]);
const TILE = 64; // the longer side of a tile, in graph units
const GAP = 6;
const LABEL = 14; // height of a tile's label line
const HEADER = 18; // height of the "step i/n" line
const BASE64 = /^[A-Za-z0-9+/]+={0,2}$/;
const previews = new WeakMap(); // node -> {step, steps, masks: [{label, active, image}], tiles}

function sega(node) {
  return NODES.has(node?.comfyClass ?? node?.type);
}

function nodeFor(detail) {
  for (const id of [detail?.display_node, detail?.node]) {
    if (id === undefined || id === null) continue;
    const node = app.graph?.getNodeById?.(id) ?? app.graph?.getNodeById?.(Number(id));
    if (sega(node)) return node;
  }
  return null;
}

function layout(node, count) {
  const columns = Math.max(1, Math.floor((node.size[0] - GAP) / (TILE + GAP)));
  const rows = Math.ceil(count / columns);
  return { columns, height: HEADER + rows * (TILE + LABEL + GAP) };
}

function received(event) {
  const detail = event?.detail;
  const node = nodeFor(detail);
  if (!node || !Array.isArray(detail.masks)) return;
  const old = previews.get(node);
  const masks = detail.masks.map((m, i) => {
    const entry = { label: String(m?.label ?? `#${i + 1}`), active: !!m?.active, image: null };
    if (entry.active && typeof m.png === "string" && BASE64.test(m.png)) {
      const image = new Image();
      image.onload = () => node.setDirtyCanvas?.(true, false);
      image.src = `data:image/png;base64,${m.png}`;
      // keep drawing the previous picture until the new one has loaded
      entry.image = image;
      entry.previous = old?.masks?.[i]?.image ?? null;
    }
    return entry;
  });
  previews.set(node, { step: Number(detail.step), steps: Number(detail.steps), masks, tiles: [] });
  const need = (node.computeSize?.()[1] ?? 0) + layout(node, masks.length).height;
  if (node.size[1] < need) node.setSize?.([node.size[0], need]);
  node.setDirtyCanvas?.(true, false);
}

function fitText(ctx, text, width) {
  if (ctx.measureText(text).width <= width) return text;
  let end = text.length;
  while (end > 0 && ctx.measureText(`${text.slice(0, end)}\u2026`).width > width) end--;
  return `${text.slice(0, end)}\u2026`;
}

function draw(node, ctx, preview) {
  const { columns, height } = layout(node, preview.masks.length);
  const top = node.size[1] - height;
  ctx.save();
  ctx.font = "11px sans-serif";
  ctx.textBaseline = "middle";
  ctx.textAlign = "left";
  ctx.fillStyle = "#aaa";
  const step = Number.isFinite(preview.step) ? `step ${preview.step + 1}/${preview.steps}` : "";
  ctx.fillText(`SEGA: where concepts act \u00b7 ${step}`, GAP, top + HEADER / 2);
  preview.tiles = [];
  const loaded = (m) => (m.image?.complete && m.image.naturalWidth ? m.image : m.previous);
  const sample = preview.masks.map(loaded).find((p) => p?.naturalWidth);
  // every tile has the latent's aspect, the inactive ones too
  const scale = sample ? TILE / Math.max(sample.naturalWidth, sample.naturalHeight) : 0;
  const w = sample ? Math.round(sample.naturalWidth * scale) : TILE;
  const h = sample ? Math.round(sample.naturalHeight * scale) : TILE;
  preview.masks.forEach((mask, i) => {
    const x = GAP + (i % columns) * (TILE + GAP);
    const y = top + HEADER + Math.floor(i / columns) * (TILE + LABEL + GAP);
    const picture = loaded(mask);
    ctx.fillStyle = "#000";
    ctx.fillRect(x, y, w, h);
    if (mask.active && picture?.naturalWidth) {
      ctx.imageSmoothingEnabled = false;
      ctx.drawImage(picture, x, y, w, h);
    } else {
      ctx.strokeStyle = "#555";
      ctx.setLineDash([3, 3]);
      ctx.strokeRect(x + 0.5, y + 0.5, w - 1, h - 1);
      ctx.setLineDash([]);
      ctx.fillStyle = "#777";
      ctx.textAlign = "center";
      ctx.fillText("inactive", x + w / 2, y + h / 2);
      ctx.textAlign = "left";
    }
    ctx.fillStyle = mask.active ? "#ddd" : "#888";
    ctx.fillText(fitText(ctx, mask.label, TILE), x, y + h + LABEL / 2);
    preview.tiles.push({ x, y, w, h, label: mask.label, active: mask.active, shown: !!mask.image && picture === mask.image });
  });
  ctx.restore();
}

/** What the preview of `node` shows (for tests): step, steps and the tiles last drawn, in node coordinates. */
export function maskPreview(node) {
  const p = previews.get(node);
  return p ? { step: p.step, steps: p.steps, tiles: p.tiles.map((t) => ({ ...t })) } : null;
}

app.registerExtension({
  name: "comfyui-sega.MaskPreview",
  setup() {
    api.addEventListener("sega.masks", received);
  },
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODES.has(nodeData?.name)) return;
    const previous = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      const result = previous?.apply(this, arguments);
      const preview = previews.get(this);
      if (preview && !this.flags?.collapsed) draw(this, ctx, preview);
      return result;
    };
  },
});
