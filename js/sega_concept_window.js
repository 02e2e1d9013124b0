// SEGA: shows on each SEGA Concept node the steps in which it acts (warm-up .. cool-down).
// Drawn on the canvas only: adds no widget and nothing to saved workflows or prompts.
import { app } from "../../scripts/app.js";

const NEVER = 10000; // the cooldown default: never stops

function windowText(node) {
  const value = (name) => node.widgets?.find((w) => w.name === name)?.value;
  const scale = Number(value("edit_scale"));
  const weight = Number(value("weight"));
  const warmup = Number(value("warmup"));
  const cooldown = Number(value("cooldown"));
  if (!Number.isFinite(warmup) || !Number.isFinite(cooldown)) return null;
  if (scale === 0 || weight === 0) return "off";
  if (cooldown <= warmup) return "never acts";
  const end = cooldown >= NEVER ? "end" : String(cooldown);
  return `steps ${warmup}\u2192${end}`;
}

app.registerExtension({
  name: "comfyui-sega.ConceptWindow",
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== "SEGAConcept") return;
    const previous = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      const result = previous?.apply(this, arguments);
      if (this.flags?.collapsed) return result;
      const text = windowText(this);
      if (!text) return result;
      const titleHeight = globalThis.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
      ctx.save();
      ctx.font = "11px sans-serif";
      ctx.textAlign = "right";
      ctx.textBaseline = "middle";
      ctx.fillStyle = text === "off" || text === "never acts" ? "#c88" : "#8c8";
      ctx.fillText(text, this.size[0] - 8, -titleHeight / 2);
      ctx.restore();
      return result;
    };
  },
});
