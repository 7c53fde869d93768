"""MMCAF-Net: lung-lesion histology from a chest CT and a short clinical record, inside 3D Slicer.

Thin on purpose: the widget is Qt code only and reaches the library through the Logic; all that runs
without Qt (nodes, the classification job, outputs, models, dependencies, the clinical form's fields)
is MMCAFNetLib's, installed next to this module. Nothing heavy is imported or run at import.
"""

import json
import logging
import os
import unittest
from typing import Annotated, Optional, Union

import qt
import slicer
import vtk
from slicer import (
    vtkMRMLMarkupsFiducialNode,
    vtkMRMLMarkupsROINode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
)
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

DEMO_MODEL_ID = "mmcafnet-lite-demo"
POLL_INTERVAL_MS = 100
TITLE = "MMCAF-Net"


class MMCAFNet(ScriptedLoadableModule):
    """Module description shown in Slicer's module panel and help."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MMCAF-Net Lung Lesion Classifier"
        self.parent.categories = ["Quantification"]
        self.parent.contributors = ["MMCAFNet contributors"]
        self.parent.helpText = """
Classifies the histological subtype of a lung lesion (adenocarcinoma, small cell, large cell or squamous
cell carcinoma) from the chest CT and a short clinical record (sex, age, weight, TNM stage, smoking) with
MMCAF-Net: a 3D feature pyramid with attention over the CT, a KAN encoder over the record, and
multi-scale cross-attention fusion.<br><br>
Place a point (or an ROI, or a segmentation) on the lesion, check the form, press <b>Apply</b>. Results:
a table of class probabilities, an attention heatmap over the CT with its highest places as numbered
points, and the region that drove the prediction as a labelmap and a segmentation, under the CT's study.<br><br>
<b>Research use only.</b> The bundled demo model is trained on synthetic phantoms and says nothing about
real patients.<br><br>
Method: Yu et al., "Small Lesions-aware Bidirectional Multimodal Multiscale Fusion Network for Lung
Disease Classification", MICCAI 2025, <a href="https://arxiv.org/abs/2508.04205">arXiv:2508.04205</a>.
Data: Li et al., "A Large-Scale CT and PET/CT Dataset for Lung Cancer Diagnosis (Lung-PET-CT-Dx)", The
Cancer Imaging Archive, 2020, <a href="https://doi.org/10.7937/TCIA.2020.NNC2-0461">doi:10.7937/TCIA.2020.NNC2-0461</a>.
"""
        self.parent.acknowledgementText = """
Built on the MMCAF-Net method of Yu et al. (MICCAI 2025) and trained with the Lung-PET-CT-Dx
collection of Li et al. (TCIA, 2020, CC BY 4.0). Uses 3D Slicer, the SlicerPyTorch extension and PyTorch.
"""


@parameterNodeWrapper
class MMCAFNetParameterNode:
    """GUI state, saved with the scene.

    lesion: point, ROI or segmentation; Optional, as the wrapper writes each default (None: whole CT).
    modelId: catalog id or user model file. clinicalRecord: the form's values as JSON (per model schema).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    lesion: Optional[Union[vtkMRMLMarkupsFiducialNode, vtkMRMLMarkupsROINode, vtkMRMLSegmentationNode]]
    modelId: str = DEMO_MODEL_ID
    device: Annotated[str, Choice(["auto", "cuda", "cpu"])] = "auto"
    heatmapMethod: Annotated[str, Choice(["model", "attention", "gradcam", "gradcam++", "none"])] = "model"
    heatmapThreshold: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    showOutputs: bool = True
    clinicalRecord: str = "{}"


class MMCAFNetWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: inputs, clinical form, model, options, Apply/Cancel, progress and result (Qt only)."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._formWidgets = {}
        self._models = []
        self._timer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MMCAFNet.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MMCAFNetLogic()

        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.onPollJob)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.prefillButton.connect("clicked(bool)", self.onPrefillFromDicom)
        self.ui.modelSelector.connect("currentIndexChanged(int)", self.onModelSelected)
        self.ui.addModelButton.connect("clicked(bool)", self.onAddModelFromFile)
        self.ui.downloadModelButton.connect("clicked(bool)", self.onDownloadModel)
        self.ui.openModelsFolderButton.connect("clicked(bool)", self.onOpenModelsFolder)
        self.ui.clearModelsFolderButton.connect("clicked(bool)", self.onClearModelsFolder)
        self.ui.loadResultsButton.connect("clicked(bool)", self.onLoadResults)
        self.ui.progressBar.setVisible(False)
        self.ui.demoWarningLabel.setVisible(False)

        self.populateModels()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.cancelJob()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event) -> None:
        self.cancelJob()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first and not first.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = first

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._selectModel(self._parameterNode.modelId)
            self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None) -> None:
        if self._job is not None:
            return
        ready = bool(self._parameterNode and self._parameterNode.inputVolume)
        self.ui.applyButton.enabled = ready
        self.ui.applyButton.text = "Apply"
        self.ui.applyButton.toolTip = "Classify the lesion" if ready else "Select the CT volume first"

    def populateModels(self) -> None:
        """Fill the model selector from Resources/Models.json and the user models folder."""
        self.ui.modelSelector.blockSignals(True)
        self.ui.modelSelector.clear()
        try:
            self._models = self.logic.panel.models.entries()
        except (OSError, ValueError) as exc:
            self._models = []
            slicer.util.errorDisplay(f"The model catalog cannot be read: {exc}", windowTitle=TITLE)
        for entry in self._models:
            suffix = "  [download]" if entry.downloadable else ("  [user]" if entry.source == "user" else "")
            self.ui.modelSelector.addItem(entry.title + suffix, entry.file or entry.id)
        self.ui.modelSelector.blockSignals(False)

    def _selectModel(self, modelId: str) -> None:
        index = self.logic.panel.models.index(self._models, modelId)
        if index is not None:
            self.ui.modelSelector.currentIndex = index
        self.onModelSelected(self.ui.modelSelector.currentIndex)

    def currentModel(self):
        index = self.ui.modelSelector.currentIndex
        return self._models[index] if 0 <= index < len(self._models) else None

    def onModelSelected(self, index: int) -> None:
        entry = self.currentModel()
        if entry is None:
            return
        if self._parameterNode:
            self._parameterNode.modelId = self.logic.panel.models.key(entry)
        self.ui.downloadModelButton.enabled = entry.downloadable
        self.ui.modelInfoLabel.text = f"{entry.description} Licence: {entry.licence}.".strip()
        self.ui.demoWarningLabel.setVisible(entry.demo)
        self.buildClinicalForm(entry)

    def onAddModelFromFile(self) -> None:
        path = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(), "Add MMCAF-Net model", "", "MMCAF-Net checkpoint (*.pt *.pth *.zip)"
        )
        if path:
            with slicer.util.tryWithErrorDisplay("The file could not be added as a model.", waitCursor=True):
                entry = self.logic.panel.models.add_file(path)
                self.populateModels()
                self._selectModel(entry.file)

    def onDownloadModel(self) -> None:
        entry = self.currentModel()
        if entry is None or not entry.downloadable or not slicer.util.confirmOkCancelDisplay(
            f"Download '{entry.title}' from {entry.url} into {self.logic.modelsFolder()}?\n"
            "The file is checked against the catalog's checksum before use."
        ):
            return
        with slicer.util.tryWithErrorDisplay("The model could not be downloaded.", waitCursor=True):
            self.logic.panel.models.download(entry)
            slicer.util.showStatusMessage(f"Downloaded {entry.title}", 3000)

    def onOpenModelsFolder(self) -> None:
        folder = self.logic.modelsFolder()
        os.makedirs(folder, exist_ok=True)
        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(folder))

    def onClearModelsFolder(self) -> None:
        if slicer.util.confirmYesNoDisplay(f"Delete every downloaded and added model in {self.logic.modelsFolder()}?"):
            self.logic.clearCache()
            removed = self.logic.panel.models.clear()
            slicer.util.showStatusMessage(f"Removed {removed} file(s) from the models folder", 3000)
            self.populateModels()
            self._selectModel(DEMO_MODEL_ID)

    def onLoadResults(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), "Load an MMCAF-Net result folder")
        if folder:
            with slicer.util.tryWithErrorDisplay("The result folder could not be loaded.", waitCursor=True):
                selected = self._parameterNode.inputVolume if self._parameterNode else None
                self.ui.resultLabel.text = self.logic.panel.load_results(folder, selected)

    def buildClinicalForm(self, entry) -> None:
        """One row per field of the model's own schema; every field can stay 'unknown' (imputed)."""
        layout = self.ui.clinicalFormWidget.layout()
        while layout.rowCount():
            layout.removeRow(0)  # deletes the row's widgets
        self._formWidgets = {}
        fields, note = self.logic.panel.form_fields(entry)
        if note:
            layout.addRow(qt.QLabel(note))
        saved = self.logic.panel.saved_record(self._parameterNode.clinicalRecord if self._parameterNode else "")
        for spec in fields:
            if spec.kind == "continuous":
                widget = qt.QDoubleSpinBox()
                step = 1.0 if spec.maximum - spec.minimum > 20 else 0.1
                widget.setRange(spec.minimum - step, spec.maximum)  # the bottom value reads "unknown"
                widget.setSingleStep(step)
                widget.setSpecialValueText("unknown")
                widget.setSuffix(f" {spec.unit}" if spec.unit else "")
                widget.value = float(saved[spec.name]) if saved.get(spec.name) is not None else widget.minimum
                widget.connect("valueChanged(double)", self._storeRecord)
            else:
                widget = qt.QComboBox()
                for value, label in spec.choices:  # the first choice is "unknown"
                    widget.addItem(label, value)
                widget.setCurrentIndex(max(0, widget.findData(str(saved.get(spec.name)))))
                widget.connect("currentIndexChanged(int)", self._storeRecord)
            widget.toolTip = spec.tooltip
            layout.addRow(spec.label + ":", widget)
            self._formWidgets[spec.name] = widget

    def formRecord(self) -> dict:
        record = {}
        for name, widget in self._formWidgets.items():
            if isinstance(widget, qt.QDoubleSpinBox):
                record[name] = None if widget.value <= widget.minimum else float(widget.value)
            else:
                record[name] = None if widget.currentData in (None, "unknown") else widget.currentData
        return record

    def _storeRecord(self, *args) -> None:
        if self._parameterNode:
            self._parameterNode.clinicalRecord = json.dumps(self.formRecord())

    def onPrefillFromDicom(self) -> None:
        """Sex, age and weight from the CT's DICOM header, when it came from the DICOM database."""
        record = self.logic.panel.record_from_dicom(self._parameterNode.inputVolume if self._parameterNode else None)
        slicer.util.showStatusMessage(self.logic.panel.header_fill_message(record), 5000)  # says what was filled
        if not record:
            return
        self._parameterNode.clinicalRecord = json.dumps({**self.formRecord(), **record})
        self.buildClinicalForm(self.currentModel())  # the form shows the stored record

    def onApplyButton(self) -> None:
        if self._job is not None:
            self.cancelJob()
            return
        outcome = self.logic.ensureDependencies()
        if not outcome.may_classify:
            self.reportSetup(outcome)
            return
        with slicer.util.tryWithErrorDisplay("Classification could not start.", waitCursor=True):
            p = self._parameterNode
            self._job = self.logic.start(p.inputVolume, self.formRecord(), p.lesion, self.logic.panel.options(p, self.currentModel()))
            self.ui.applyButton.text = "Cancel"
            self.ui.applyButton.toolTip = "Stop the classification; the scene is left unchanged"
            self.ui.progressBar.value = 0
            self.ui.progressBar.setVisible(True)
            self.ui.resultLabel.text = f"{self._job.status}..."
            self._timer.start()

    def reportSetup(self, outcome) -> None:
        """After an install, stop: show the model's own form (readable now) and leave Apply to the user."""
        if outcome.installed:
            self.buildClinicalForm(self.currentModel())
        if outcome.message:
            (slicer.util.errorDisplay if outcome.error else slicer.util.infoDisplay)(outcome.message, windowTitle=TITLE)
        if outcome.restart and slicer.util.confirmYesNoDisplay("Restart Slicer now to finish the installation?"):
            slicer.util.restart()

    def onPollJob(self) -> None:
        job = self._job
        if job is None:
            self._timer.stop()
            return
        over = job.poll()
        self.ui.progressBar.value = job.percent
        self.ui.resultLabel.text = f"{job.status}..."  # starting the worker, loading the model, window n of N
        if not over:
            return
        self._timer.stop()
        self._job = None
        self.ui.progressBar.setVisible(False)
        self._checkCanApply()
        for message in job.messages:
            slicer.util.warningDisplay(message, windowTitle=TITLE)
        self.ui.resultLabel.text = self.logic.panel.job_summary(job)
        if job.error is not None and not job.cancelled:
            logging.error("MMCAF-Net classification failed", exc_info=job.error)
            slicer.util.errorDisplay(f"Classification failed: {job.error}", windowTitle=TITLE)

    def cancelJob(self) -> None:
        if self._job is not None:
            self._job.cancel()  # the next poll shows "Cancelling..."


class MMCAFNetLogic(ScriptedLoadableModuleLogic):
    """Slicer logic without Qt: parameter node, dependencies, runs; the work is MMCAFNetLib's.

    From the Python console (batch)::

        logic = slicer.util.getModuleLogic("MMCAFNet")
        logic.classifyAllVolumes(record={"sex": "M", "age": 63})
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        from MMCAFNetLib.slicer_logic import ClassificationLogic

        self.classifier = ClassificationLogic()  # starts nothing until the first classification

    def getParameterNode(self):
        return MMCAFNetParameterNode(super().getParameterNode())

    @property
    def panel(self):
        """Models, the clinical form's fields, run options, DICOM record (slicer_setup.Panel, Qt-free)."""
        from MMCAFNetLib.slicer_setup import Panel

        return Panel()

    @staticmethod
    def modelsFolder() -> str:
        """Where user models go: beside Slicer's user settings, where the panel can open and clear them."""
        from MMCAFNetLib.slicer_setup import models_folder
        return models_folder()

    @staticmethod
    def missingDependencies() -> list:
        from MMCAFNetLib.slicer_setup import missing_packages
        return missing_packages()

    @staticmethod
    def ensureDependencies():
        """Install what is missing after asking (torch via the PyTorch extension); a SetupOutcome, never raises."""
        from MMCAFNetLib.slicer_setup import ensure_dependencies
        return ensure_dependencies()

    def start(self, volumeNode, record, lesionNode=None, options=None):
        """Start a classification without blocking; poll the returned job from the main thread."""
        return self.classifier.start(volumeNode, record, lesionNode, options)

    def classify(self, volumeNode, record=None, lesionNode=None, options=None):
        """Blocking classification of one CT (console, tests). Returns (Classification, output nodes)."""
        return self.classifier.classify(volumeNode, record or {}, lesionNode, options)

    def classifyAllVolumes(self, record=None, options=None, volumeNodes=None):
        """Batch: classify every CT in the scene (or ``volumeNodes``) with the same record."""
        return self.classifier.classify_volume_nodes(volumeNodes, record_for=lambda node: dict(record or {}), options=options)

    def clearCache(self) -> None:
        self.classifier.clear_cache()


class MMCAFNetTest(ScriptedLoadableModuleTest):
    """Self-test: a synthetic case, the bundled demo model, and checks on every output node."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        try:
            self.test_DemoModelOnSyntheticCase()
        except unittest.SkipTest as skipped:
            self.delayDisplay(f"MMCAF-Net self-test skipped: {skipped}")

    def test_DemoModelOnSyntheticCase(self):
        import numpy as np

        logic = MMCAFNetLogic()
        missing = logic.missingDependencies()
        if missing:  # a test never installs anything (torch alone is gigabytes)
            self.skipTest(f"{', '.join(missing)} not installed; press Apply in the module once to install")
        from MMCAFNetLib.slicer_setup import add_demo_case, same_grid

        self.delayDisplay("Classifying a synthetic case with the demo model")
        ct, point, record = add_demo_case()
        before = slicer.util.arrayFromVolume(ct).copy()
        options = logic.panel.options(device="cpu", heatmap="attention", threshold=0.5)
        result, outputs = logic.classify(ct, record, point, options)
        self.assertTrue(result.model.get("demo"))
        self.assertAlmostEqual(float(np.sum(result.probabilities)), 1.0, places=4)
        self.assertEqual(outputs.table.GetTable().GetNumberOfRows(), len(result.class_names))
        self.assertTrue(all(same_grid(node, ct) for node in (outputs.heatmap, outputs.labelmap)))
        labels = np.unique(slicer.util.arrayFromVolume(outputs.labelmap))
        self.assertTrue(set(labels.tolist()) <= {0, result.label_value})
        segment = outputs.segmentation.GetSegmentation().GetNthSegment(0)
        self.assertEqual(segment.GetName(), result.predicted_label)
        self.assertTrue(np.array_equal(before, slicer.util.arrayFromVolume(ct)))

        count = slicer.mrmlScene.GetNumberOfNodes()
        logic.classify(ct, record, point, options)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), count)
        self.delayDisplay("MMCAF-Net self-test passed")
