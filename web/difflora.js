// The pack's touches to the stock ComfyUI frontend (loaded from WEB_DIRECTORY), written against the
// frontend's public app/api objects so that every tested frontend (1.32 and 1.49) behaves the same:
// - Sample Identity LoRA Latent and Refine Identity LoRA start with their seed fixed. The frontend
//   gives every seed widget
//   "randomize" and a V3 schema cannot choose otherwise; randomize would write a new identity
//   LoRA on every Run (and retrain a refined one). A saved workflow keeps its own choice (node configure runs after this).
// - Save Predicted LoRA shows the name it saved: the stock frontend displays a node's ui "text"
//   only for core Preview Any, so this node gets a read-only text line of its own. The line is read
//   from the frontend's kept outputs, so it survives switching workflow tabs as the images do.
// - Toy World Photo shows the chosen photo at once (before any Run) and follows the picked photo.
// - An error raised by one of the pack's nodes is titled with the node's name, not its class id.
// - The template browser's cards of the pack's workflows say what each needs (the stock browser shows
//   only the file name): the texts are web/templates.json, written by devtools/make_workflows.py.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const FIXED_SEED_NODES = ["DiffLoRASampleLoraLatent", "DiffLoRARefineLora"];
const SAVE_NODE = "DiffLoRASaveLora";
const PHOTO_NODE = "DiffLoRAToyWorldPhoto";
const NOT_SAVED = "not saved yet";

// The outputs the frontend keeps for a node of the root graph (restored on a workflow tab switch).
function keptOutput(node) {
  return app.nodeOutputs?.[String(node.id)];
}

function addSavedNameWidget(node) {
  const line = document.createElement("div");
  line.style.cssText = "font: 12px monospace; opacity: 0.85; padding: 2px 6px; white-space: pre-wrap;";
  line.textContent = NOT_SAVED;
  const widget = node.addDOMWidget("saved_lora", "difflora_saved_lora", line, {
    serialize: false, // neither in the workflow nor in the prompt: it only shows the last result
    getValue: () => line.textContent,
    setValue: (text) => { line.textContent = text; },
  });
  widget.serialize = false;
  widget.computeLayoutSize = () => ({ minHeight: 24, minWidth: 0 });
  return widget;
}

function showSavedName(node) {
  if (!app.nodeOutputs) return; // a frontend that keeps no outputs: the line keeps what onExecuted wrote
  const widget = node.widgets?.find((w) => w.name === "saved_lora");
  const text = keptOutput(node)?.text;
  const shown = text?.length ? text.join("\n") : NOT_SAVED;
  if (widget && widget.value !== shown) widget.value = shown;
}

function photoUrl(name) {
  return api.apiURL(`/difflora/toy_photo/${encodeURIComponent(name)}`);
}

// The photo the node gives, drawn as its preview (as Load Image shows its file) until a Run's own
// preview replaces it; picking another photo shows that one.
function showToyPhoto(node) {
  const name = node.widgets?.find((w) => w.name === "photo")?.value;
  if (!name || node.difflora_photo === name) return;
  node.difflora_photo = name;
  // A Run's preview of the previous photo is kept by the frontend and would be drawn again.
  if (keptOutput(node)?.images) delete app.nodeOutputs[String(node.id)];
  const img = new Image();
  img.onload = () => {
    if (node.difflora_photo !== name) return; // another photo was picked meanwhile
    node.imgs = [img];
    node.setSizeForImage?.();
    app.graph.setDirtyCanvas(true, true);
  };
  img.src = photoUrl(name);
}

// Runs every frame the node is drawn: cheap comparisons only.
function followState(nodeType, sync) {
  const onDrawForeground = nodeType.prototype.onDrawForeground;
  nodeType.prototype.onDrawForeground = function () {
    const r = onDrawForeground?.apply(this, arguments);
    sync(this);
    return r;
  };
}

function packNodeTitle(detail) {
  if (!detail?.node_type?.startsWith("DiffLoRA")) return null;
  const node = app.graph?.getNodeById?.(Number(detail.node_id)) ?? app.graph?.getNodeById?.(detail.node_id);
  return node?.title || globalThis.LiteGraph?.registered_node_types?.[detail.node_type]?.title || null;
}

// The frontend titles its execution-error dialog with the message's node_type (the class id).
const dispatch = api.dispatchCustomEvent.bind(api);
api.dispatchCustomEvent = (type, detail) => {
  const title = type === "execution_error" ? packNodeTitle(detail) : null;
  return dispatch(type, title ? { ...detail, node_type: title } : detail);
};

const DESCRIPTION_CLASS = "difflora-template-description";

async function describeTemplateCards() {
  let descriptions = {};
  try {
    descriptions = (await (await fetch(new URL("./templates.json", import.meta.url))).json()).descriptions ?? {};
  } catch (e) {
    console.warn("DiffLoRA: no template descriptions", e);
    return;
  }
  const describe = () => {
    for (const [name, text] of Object.entries(descriptions)) {
      for (const card of document.querySelectorAll(`[data-testid="template-workflow-${name}"]`)) {
        if (card.querySelector(`.${DESCRIPTION_CLASS}`)) continue;
        // The stock card repeats the file name as its description (dashes and underscores as spaces).
        const stock = Array.from(card.querySelectorAll("p, span, div")).find(
          (e) => e.children.length === 0 && e.textContent.trim() === name.replace(/[-_]/g, " "));
        const line = stock ?? document.createElement("p");
        line.textContent = text;
        line.classList.add(DESCRIPTION_CLASS);
        if (!stock) {
          line.style.cssText = "margin: 0; font-size: 12px; opacity: 0.75; line-height: 1.3;";
          const title = card.querySelector(`[title="${name}"]`) ?? card.lastElementChild;
          title.after(line);
        }
      }
    }
  };
  new MutationObserver(describe).observe(document.body, { childList: true, subtree: true });
  describe();
}

app.registerExtension({
  name: "DiffLoRA.NodeUI",
  setup() {
    describeTemplateCards();
  },
  nodeCreated(node) {
    if (FIXED_SEED_NODES.includes(node.comfyClass)) {
      const control = node.widgets?.find((w) => w.name === "control_after_generate");
      if (control) control.value = "fixed";
    }
    if (node.comfyClass === PHOTO_NODE) {
      const widget = node.widgets?.find((w) => w.name === "photo");
      const callback = widget?.callback;
      if (widget) {
        widget.callback = function () {
          const r = callback?.apply(this, arguments);
          showToyPhoto(node); // the picked photo at once, not at the next redraw
          return r;
        };
      }
      showToyPhoto(node);
    }
  },
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name === PHOTO_NODE) {
      followState(nodeType, showToyPhoto);
      const onExecuted = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function () {
        onExecuted?.apply(this, arguments);
        this.difflora_photo = this.widgets?.find((w) => w.name === "photo")?.value; // the Run's preview is it
      };
      return;
    }
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
    followState(nodeType, showSavedName);
  },
});
