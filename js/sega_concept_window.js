// SEGA: shows on each SEGA Concept and SEGA Concept (text) node the steps in which it acts (warm-up ..
// cool-down), or with window_unit "percent" the part of the schedule ("20%→80%").
// Drawn on the canvas only: adds no widget and nothing to saved workflows or prompts.
import { app } from "../../scripts/app.js";
import { windowText } from "./sega_window.js";

function nodeWindowText(node) {
  const widget = (name) => node.widgets?.find((w) => w.name === name)?.value;
  const value = (name) => Number(widget(name));
  return windowText(value("edit_scale"), value("weight"), value("warmup"), value("cooldown"),
                    widget("window_unit") ?? "steps");
}

app.registerExtension({
  name: "comfyui-sega.ConceptWindow",
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== "SEGAConcept" && nodeData?.name !== "SEGAConceptText") return;
    const previous = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      const result = previous?.apply(this, arguments);
      if (this.flags?.collapsed) return result;
      const text = nodeWindowText(this);
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
