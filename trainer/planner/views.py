"""Read-only views of the meta model for the planner's hot loop. The dry run's estimate walks a model's
parameters and modules several times; a plan estimates thousands of layouts of the same model, and a pipeline
split deep-copies the model once per stage (seconds for a 405B meta model). A view lists the parameters and
modules once, and a pipeline stage's view filters those lists by name as parallel/pp.py's split_stages cuts
the model (embeddings on the first stage, an even split of the layers, norm and output on the last), with
no copy."""

from torch import nn

from parallel.pp import split_stages, stage_layers


class ModelView:
    """What estimates read of a module (parameters, modules, its layers and ends); any other attribute is
    the module's own."""

    def __init__(self, module: nn.Module, named_params=None, named_modules=None, layers=None, ends=None):
        self._module = module
        self._params = list(module.named_parameters()) if named_params is None else named_params
        self._modules = list(module.named_modules()) if named_modules is None else named_modules
        self.layers = dict(module.layers.items()) if layers is None else layers
        ends = ends or {}
        for name in ("tok_embeddings", "norm", "output"):
            setattr(self, name, ends.get(name, getattr(module, name, None)))

    def named_parameters(self):
        return iter(self._params)

    def parameters(self):
        return (p for _, p in self._params)

    def named_modules(self):
        return iter(self._modules)

    def modules(self):
        return (m for _, m in self._modules)

    def __getattr__(self, name):
        return getattr(self._module, name)

    def stage(self, layer_ids: range, first: bool, last: bool) -> "ModelView":
        """The view of one pipeline stage: the layers `layer_ids`, with the embeddings if first and the final
        norm and output if last."""
        keep = {str(i) for i in layer_ids}

        def kept(name: str) -> bool:
            top, _, rest = name.partition(".")
            if top == "layers":
                return rest.split(".")[0] in keep
            if top == "tok_embeddings":
                return first
            if top in ("norm", "output"):
                return last
            return True

        return ModelView(self._module, [(n, p) for n, p in self._params if kept(n)],
                         [(n, m) for n, m in self._modules if n in ("", "layers") or kept(n)],
                         {i: m for i, m in self.layers.items() if i in keep},
                         {"tok_embeddings": self.tok_embeddings if first else None,
                          "norm": self.norm if last else None, "output": self.output if last else None})


def busiest_views(family, view: ModelView, pp: int, num_stages: int) -> list:
    """The stages of the pipeline rank holding the most parameters, as views (the whole model without
    pipelining). A family with a split of its own is split by it (copies: slower, as exact)."""
    if pp == 1:
        return [view]
    if family.split_stages is not split_stages:
        ranks = [[part for _, part in family.split_stages(view._module, pp_rank=r, pp_size=pp, num_stages=num_stages)]
                 for r in range(pp)]
        return max(ranks, key=lambda parts: sum(p.numel() for part in parts for p in part.parameters()))
    n_layers = len(view.layers)
    per_layer = {}
    ends = {"tok_embeddings": 0, "norm": 0, "output": 0}
    for name, p in view.named_parameters():
        top, _, rest = name.partition(".")
        if top == "layers":
            per_layer[rest.split(".")[0]] = per_layer.get(rest.split(".")[0], 0) + p.numel()
        elif top in ends:
            ends[top] += p.numel()

    def stage_params(stage: int) -> int:
        count = sum(per_layer.get(str(i), 0) for i in stage_layers(n_layers, num_stages, stage))
        if stage == 0:
            count += ends["tok_embeddings"]
        if stage == num_stages - 1:
            count += ends["norm"] + ends["output"]
        return count

    busiest = max(range(pp), key=lambda r: sum(stage_params(s) for s in range(r, num_stages, pp)))
    return [view.stage(stage_layers(n_layers, num_stages, s), first=s == 0, last=s == num_stages - 1)
            for s in range(busiest, num_stages, pp)]
