// The pack's two touches to the stock ComfyUI frontend (loaded from WEB_DIRECTORY):
// - Sample Identity LoRA Latent and Refine Identity LoRA start with their seed fixed. The frontend gives every seed widget
//   "randomize" and a V3 schema cannot choose otherwise; randomize would write a new identity
//   LoRA on every Run (and retrain a refined one). A saved workflow keeps its own choice (node configure runs after this).
// - Save Predicted LoRA shows the name it saved: the stock frontend displays a node's ui "text"
//   only for core Preview Any, so this node gets a read-only text line of its own.
import { app } from "../../scripts/app.js";

const FIXED_SEED_NODES = ["DiffLoRASampleLoraLatent", "DiffLoRARefineLora"];
const SAVE_NODE = "DiffLoRASaveLora";

function addSavedNameWidget(node) {
  const line = document.createElement("div");
  line.style.cssText = "font: 12px monospace; opacity: 0.85; padding: 2px 6px; white-space: pre-wrap;";
  line.textContent = "not saved yet";
  const widget = node.addDOMWidget("saved_lora", "difflora_saved_lora", line, {
    serialize: false, // neither in the workflow nor in the prompt: it only shows the last result
    getValue: () => line.textContent,
    setValue: (text) => { line.textContent = text; },
  });
  widget.serialize = false;
  widget.computeLayoutSize = () => ({ minHeight: 24, minWidth: 0 });
  return widget;
}

app.registerExtension({
  name: "DiffLoRA.NodeUI",
  nodeCreated(node) {
    if (FIXED_SEED_NODES.includes(node.comfyClass)) {
      const control = node.widgets?.find((w) => w.name === "control_after_generate");
      if (control) control.value = "fixed";
    }
  },
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== SAVE_NODE) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      onNodeCreated?.apply(this, arguments);
      addSavedNameWidget(this);
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      const widget = this.widgets?.find((w) => w.name === "saved_lora");
      if (widget && output?.text?.length) widget.value = output.text.join("\n");
    };
  },
});
